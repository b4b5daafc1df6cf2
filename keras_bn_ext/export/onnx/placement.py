"""Where onnxruntime placed each node: read from its own log.

With verbose logging while a session is created, onnxruntime writes

    [V:onnxruntime:, session_state.cc:1342 VerifyEachNodeIsAssignedToAnEp] Node placements
    [V:onnxruntime:, ...]  Node(s) placed on [CUDAExecutionProvider]. Number of nodes: 52
    [V:onnxruntime:, ...]   Conv (conv2d_1/convolution)
    [V:onnxruntime:, ...]  Node(s) placed on [CPUExecutionProvider]. Number of nodes: 1
    [V:onnxruntime:, ...]   ConvTranspose (up/conv2d_transpose)

(or "All nodes placed on [P]" when one provider took everything), says why a node left
the GPU in lines that name it ("CUDA kernel not found in registries for Op type: X node
name: Y", "Force fallback to CPU execution for node: Y because ...", "Dropping the
ConvTranspose node ... to CPU because ..."), and counts the copies it inserted
("N Memcpy nodes are added to the graph G for CUDAExecutionProvider").
`session.get_providers()` says none of this: it lists the providers asked for.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

__all__ = ["CpuNode", "Placement", "parse_placement"]

CPU = "CPUExecutionProvider"
_PREFIX = re.compile(r"^.*?\[[VIWEF]:onnxruntime:[^\]]*\]\s?")
_ALL = re.compile(r"^\s*All nodes placed on \[(\w+)\]\. Number of nodes: (\d+)")
_SOME = re.compile(r"^\s*Node\(s\) placed on \[(\w+)\]\.\s+Number of nodes: (\d+)")
_NODE = re.compile(r"^\s{2,}(\S+) \((.*)\)\s*$")
_MEMCPY = re.compile(r"(\d+) Memcpy nodes are added to the graph")
# onnxruntime's deliberate choice: shape computations are cheaper on the CPU. Such nodes
# are not compute nodes that failed to reach the GPU.
_CPU_PREFERRED = "Force fallback to CPU execution for node"


@dataclass
class CpuNode:
    op_type: str
    name: str
    reason: str  # onnxruntime's own words, or "not given in onnxruntime's log"
    compute: bool  # False for the shape computations onnxruntime keeps on the CPU on purpose


@dataclass
class Placement:
    nodes_per_provider: dict[str, int] = field(default_factory=dict)
    cpu_nodes: list[CpuNode] = field(default_factory=list)
    memcpy_nodes: int = 0

    @property
    def cpu_compute_nodes(self) -> list[CpuNode]:
        return [n for n in self.cpu_nodes if n.compute]

    def to_dict(self) -> dict:
        return {
            "nodes_per_provider": self.nodes_per_provider,
            "cpu_nodes": [asdict(n) for n in self.cpu_nodes],
            "cpu_compute_nodes": len(self.cpu_compute_nodes),
            "memcpy_nodes": self.memcpy_nodes,
        }


def _reason(name: str, messages: list[str]) -> tuple[str, bool]:
    mentions = [m for m in messages if name and (f": {name}" in m or f" {name} " in m or m.endswith(f" {name}"))]
    for message in mentions:
        if _CPU_PREFERRED in message:
            return "onnxruntime keeps this shape computation on the CPU on purpose (cheaper there)", False
    for message in mentions:
        if "kernel not found" in message:
            return message, True
    for message in mentions:
        if "CPU" in message or "not support" in message:
            return message, True
    return "not given in onnxruntime's log", True


def parse_placement(log: str) -> Placement | None:
    """The placement section of an onnxruntime verbose log, or None if it has none."""
    messages = [_PREFIX.sub("", line) for line in log.splitlines()]
    placement, provider, found = Placement(), None, False
    listed: list[tuple[str, str]] = []
    for message in messages:
        memcpy = _MEMCPY.search(message)
        if memcpy:
            placement.memcpy_nodes += int(memcpy.group(1))
        match = _ALL.match(message) or _SOME.match(message)
        if match:
            found = True
            provider = match.group(1)
            placement.nodes_per_provider[provider] = (
                placement.nodes_per_provider.get(provider, 0) + int(match.group(2)))
            continue
        node = _NODE.match(message) if provider else None
        if node and provider == CPU:
            listed.append((node.group(1), node.group(2)))
        elif not node:
            provider = None
    if not found:
        return None
    for op_type, name in listed:
        reason, compute = _reason(name, messages)
        placement.cpu_nodes.append(CpuNode(op_type=op_type, name=name, reason=reason, compute=compute))
    return placement

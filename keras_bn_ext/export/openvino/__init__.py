"""OpenVINO, the third target: convert the (folded) Keras model with `openvino.convert_model`
and save the IR (`.xml` + `.bin`, written together or not at all); run it on OpenVINO's CPU
runtime in a child process (`_openvino_worker`) in float32 (`INFERENCE_PRECISION_HINT=f32`:
on a CPU with bf16 or AMX, OpenVINO's default runs float32 models in bfloat16, off by ~1e-3).
Folding, the comparison, the float64 judgement and the stage are the shared ones
(`export.driver`); this folder holds the converter and the runner only."""

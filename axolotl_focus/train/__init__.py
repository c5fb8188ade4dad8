"""Stage 3 of the pipeline, training: the FOCUS trainer, its teacher (in process or from a
teacher-logit cache), the RePAIR pair dataset type, the baseline terms and the fused losses."""

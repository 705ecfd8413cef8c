"""`lowrank.squeeze`: LoRA-Squeeze of PEFT / kohya / diffusers adapters, extraction, the callback."""

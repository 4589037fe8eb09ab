"""Training of the stored values after quantization: per block (`finetune`) and end to end against the float
model (`distill`). Codes, widths, the format and the bit count never change."""

"""The packed on-disk format of quantized models, the quantized linear modules that run from it, and
save / load of whole models (`cmpq.packed.model_io`)."""

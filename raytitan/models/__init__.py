"""Model families, one folder each: args and flavors, the model, its parallelization, and its
Hugging Face adapter."""

MODELS = ("llama3",)  # model.name

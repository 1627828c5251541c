"""Reading a model: a name -> a folder (`hub`: "demo", a path, a Hugging Face Hub id), its
safetensors files checked (`safetensors_file`), and every tensor strictly matched to the config
and put in the parameter tree (`weights`); `bf16` keeps the matrices in bfloat16 if asked."""

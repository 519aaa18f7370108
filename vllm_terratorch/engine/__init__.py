"""The vLLM adapter: the model class vLLM serves (`model`) and the shims for vLLM's moving internals
(`compat`). The only layer that imports vLLM's model API."""

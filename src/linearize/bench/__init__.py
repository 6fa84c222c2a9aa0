"""Benchmarks (the measurements behind `linearize bench`): decode and prefill speed (`speed`),
memory and isolation (`memory`), llama.cpp as a reference (`llama_cpp`), speculative decoding
(`speculative`), and the result records, tables and plots (`report`)."""

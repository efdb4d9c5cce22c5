"""Tools that measure: the engine in-process (bench_engine.py), trees (tune_tree.py), a model and its
heads (eval_model.py), the service under load (loadgen.py and baseline.py, beside benchmark.py at the
top level; soak.py, loop_stall.py), the GPU figures (gpu_figures.py, device_build.sh) and llama.cpp
side by side (peer_llama_cpp.py). Run them as `python -m bench.NAME`."""

"""The engine process: it owns the model and runs the decode loop.

messages.py is what it exchanges with the HTTP process (the only module the HTTP side imports);
process.py its entry points; core.py the loop; scheduler.py the batching policy; decode.py the
decode step (Engine: admit, step = propose -> verify -> accept -> commit, filter) over kv_cache.py,
tree.py, sampling.py and sequence.py; adaptive.py and calibration.py choose each step's tree;
serving.py builds what the settings describe; int4.py is the 4-bit CPU forward, cuda_graphs.py the
CUDA one; lockstep.py keeps tensor-parallel ranks together."""

import torch

# CI runs the suite in 2 xdist workers on 2 cores: one intra-op thread per worker avoids
# oversubscription (measured: 2 threads per worker made a forward+backward ~20x slower).
torch.set_num_threads(1)

"""copyfree core: preprocessing, key packing, Hamming search and gRPC plumbing shared by
training, encoder, index, gateway and evaluation."""

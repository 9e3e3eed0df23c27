// Tests build models from torch.manual_seed, and libtorch's generator is process-wide: run them one at a time.
[assembly: CollectionBehavior(DisableTestParallelization = true)]

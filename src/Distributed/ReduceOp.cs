namespace LoRAHub.Distributed;

/// <summary>How all_reduce and reduce_scatter combine the ranks' values (torch.distributed.ReduceOp).</summary>
public enum ReduceOp { SUM, PRODUCT, MIN, MAX }

namespace LoRAHub.Plugins.DoRA;

/// <summary>How DoRA computes the row norms ‖W0 + s·B·A‖ (both give the same values within rounding).</summary>
public enum DoraNormMethod
{
    /// <summary>
    /// From ‖W0_i‖² (cached; W0 is frozen), W0·Aᵀ (out×r) and A·Aᵀ (r×r): no weight-sized temporary, one pass over W0.
    /// </summary>
    Factored,

    /// <summary>Materialises V = W0 + s·B·A in fp32 (one weight-sized temporary) and takes its row norms: the reference.</summary>
    Direct,
}

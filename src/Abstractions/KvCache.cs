using static TorchSharp.torch;

namespace LoRAHub.Abstractions;

/// <summary>Keys and values of earlier positions, per layer, for incremental decoding (transformers' DynamicCache).</summary>
public sealed class KvCache : IDisposable
{
    private readonly Tensor?[] keys, values;

    public KvCache(int layers)
    {
        keys = new Tensor?[layers];
        values = new Tensor?[layers];
    }

    /// <summary>Number of positions already cached.</summary>
    public long Length => keys.Length == 0 ? 0 : keys[0]?.size(2) ?? 0;

    /// <summary>Appends this step's (batch, kv_heads, new, head_dim) keys/values; returns the full ones (in the caller's scope).</summary>
    public (Tensor k, Tensor v) Append(int layer, Tensor k, Tensor v)
    {
        var (oldK, oldV) = (keys[layer], values[layer]);
        var fullK = oldK is null ? k.alias() : cat([oldK, k], 2);
        var fullV = oldV is null ? v.alias() : cat([oldV, v], 2);
        oldK?.Dispose();
        oldV?.Dispose();
        // The cache holds its own handles, outside any dispose scope, until the next append or Dispose.
        keys[layer] = fullK.alias().DetachFromDisposeScope();
        values[layer] = fullV.alias().DetachFromDisposeScope();
        return (fullK, fullV);
    }

    public void Dispose()
    {
        foreach (var t in keys.Concat(values)) t?.Dispose();
        Array.Clear(keys);
        Array.Clear(values);
    }
}

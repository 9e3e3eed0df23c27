using System.Globalization;

namespace LoRAHub.TorchExtensions;

/// <summary>What one layer keeps for backward.</summary>
public enum LayerCheckpoint
{
    /// <summary>All its activations, as autograd saves them (no recomputation).</summary>
    Keep,
    /// <summary>Only its input, on the device; the rest is recomputed in backward (<see cref="torchx.utils.checkpoint"/>).</summary>
    Checkpoint,
    /// <summary>Only its input, parked in pinned host memory until backward (checkpoint with offload: true).</summary>
    Offload,
}

/// <summary>
/// Which decoder layers keep their activations, which are checkpointed, and which are checkpointed with their input
/// offloaded to host memory: <see cref="None"/>, <see cref="All"/>, <see cref="Offload"/>, or chosen by a memory
/// budget (<see cref="Budget"/>). A model asks <see cref="Plan"/> once per forward with its layers' sizes.
/// </summary>
public sealed class CheckpointPolicy
{
    private CheckpointPolicy(string name, long? budgetBytes, bool allowOffload)
    {
        Name = name;
        BudgetBytes = budgetBytes;
        AllowOffload = allowOffload;
    }

    /// <summary>Every layer keeps its activations (no checkpointing).</summary>
    public static CheckpointPolicy None { get; } = new("none", null, false);

    /// <summary>Every layer is checkpointed, its input kept on the device (GradientCheckpointing = true).</summary>
    public static CheckpointPolicy All { get; } = new("all", null, false);

    /// <summary>Every layer is checkpointed and its input offloaded to pinned host memory (CUDA; on the CPU as <see cref="All"/>).</summary>
    public static CheckpointPolicy Offload { get; } = new("offload", null, true);

    /// <summary>
    /// As many layers as fit keep their activations, the rest are checkpointed; when even the checkpointed inputs do not
    /// fit, the layers beyond the budget have their inputs offloaded (unless <paramref name="allow_offload"/> is false,
    /// when all are checkpointed on the device: the least memory possible without offload). <paramref name="bytes"/>
    /// bounds the device memory the decoder layers' saved activations take between forward and backward (not the
    /// weights, optimizer state, or one layer's working set during its own forward or backward).
    /// </summary>
    public static CheckpointPolicy Budget(long bytes, bool allow_offload = true)
    {
        if (bytes < 0)
            throw new ArgumentOutOfRangeException(nameof(bytes), bytes,
                "the activation memory budget must be zero or more bytes (0 = keep nothing on the device); for no limit use CheckpointPolicy.None");
        return new($"budget:{bytes}" + (allow_offload ? "" : ",no-offload"), bytes, allow_offload);
    }

    /// <summary>"none", "all", "offload", "budget:BYTES" or "budget:BYTES,no-offload".</summary>
    public string Name { get; }

    /// <summary>The budget in bytes (null for the fixed policies).</summary>
    public long? BudgetBytes { get; }

    /// <summary>Whether layers may have their inputs offloaded to host memory.</summary>
    public bool AllowOffload { get; }

    /// <summary>True when some layer may be checkpointed (all but <see cref="None"/>).</summary>
    public bool Checkpoints => !ReferenceEquals(this, None);

    public override string ToString() => Name;

    /// <summary>
    /// One choice per layer, for <paramref name="layers"/> equal layers that save <paramref name="kept_bytes_per_layer"/>
    /// for backward when they keep their activations and <paramref name="input_bytes_per_layer"/> when checkpointed.
    /// Under a budget, layers are ordered [offloaded | checkpointed | kept]: the last layers keep their activations
    /// (backward frees them first, before the recomputations start), the first ones are offloaded (backward reaches them
    /// last, so their copies back have the most time).
    /// </summary>
    public LayerCheckpoint[] Plan(int layers, long kept_bytes_per_layer, long input_bytes_per_layer)
    {
        if (layers < 0) throw new ArgumentOutOfRangeException(nameof(layers), layers, "a model has zero or more layers");
        if (kept_bytes_per_layer < 0 || input_bytes_per_layer < 0)
            throw new ArgumentOutOfRangeException(nameof(kept_bytes_per_layer), "layer activation sizes must be zero or more bytes");
        var plan = new LayerCheckpoint[layers];
        if (ReferenceEquals(this, None)) return plan;
        if (BudgetBytes is not long budget)
        {
            Array.Fill(plan, AllowOffload ? LayerCheckpoint.Offload : LayerCheckpoint.Checkpoint);
            return plan;
        }
        long n = layers, a = kept_bytes_per_layer, i = Math.Min(input_bytes_per_layer, kept_bytes_per_layer);
        long keep, checkpoint;
        if (Fits(n, a, budget))
        {
            keep = n;
            checkpoint = 0;
        }
        else if (Fits(n, i, budget))
        {
            // k kept + (n − k) checkpointed: k·a + (n − k)·i ≤ budget.
            keep = a == i ? n : Math.Min(n, (budget - n * i) / (a - i));
            checkpoint = n - keep;
        }
        else
        {
            keep = 0;
            checkpoint = !AllowOffload ? n : i == 0 ? n : Math.Min(n, budget / i);
        }
        var offload = n - keep - checkpoint;
        for (var l = 0; l < layers; l++)
            plan[l] = l < offload ? LayerCheckpoint.Offload : l < offload + checkpoint ? LayerCheckpoint.Checkpoint : LayerCheckpoint.Keep;
        return plan;
    }

    // count·bytes ≤ budget without overflowing.
    private static bool Fits(long count, long bytes, long budget) => bytes == 0 || count <= budget / bytes;

    /// <summary>
    /// Bytes one Llama-structured decoder layer (pre-norm attention + gated MLP) saves for backward when training adapters on
    /// a frozen base, over <paramref name="tokens"/> tokens. Analytic: per token, the tensors autograd keeps are the layer
    /// input (input norm and residual), the normed input (q/k/v projections), q, k and v after RoPE plus the attention
    /// output (SDPA; the output is also o_proj's input), the attention residual sum (post-attention norm), its normed
    /// value (gate/up projections), gate and up (SwiGLU) and SwiGLU's output (down projection): 6·hidden + 2·kv_hidden +
    /// 3·intermediate elements, plus SDPA's fp32 log-sum-exp per head and the norms' fp32 reciprocal RMS. Adapter
    /// activations (rank r per projection) and the frozen base's absent weight gradients add nothing of that order;
    /// unfused fallbacks (composite RMSNorm, SwiGLU, repeated GQA k/v) keep more, so a measured first step may exceed it.
    /// <paramref name="mlp_chunked"/>: the MLP runs in token chunks (<c>torchx.utils.sequence_chunked</c>), which keeps only
    /// its input (already counted) and recomputes gate, up and their product in backward: the 3·intermediate term goes.
    /// </summary>
    public static long DecoderLayerActivationBytes(long tokens, long hidden, long kv_hidden, long intermediate, long heads, long element_size,
        bool mlp_chunked = false)
    {
        if (tokens < 0 || hidden <= 0 || kv_hidden <= 0 || intermediate <= 0 || heads <= 0 || element_size <= 0)
            throw new ArgumentOutOfRangeException(nameof(tokens), "layer sizes must be positive (tokens zero or more)");
        var perToken = (6 * hidden + 2 * kv_hidden + (mlp_chunked ? 0 : 3 * intermediate)) * element_size + heads * 4 + 2 * 4;
        return tokens * perToken;
    }

    /// <summary>Bytes of a checkpointed layer's saved input: tokens × hidden elements.</summary>
    public static long LayerInputBytes(long tokens, long hidden, long element_size) => tokens * hidden * element_size;

    /// <summary>
    /// Parses "none", "all", "offload", or "budget:SIZE" / "budget:SIZE,no-offload" where SIZE is bytes or a number with
    /// KiB, MiB or GiB (e.g. "budget:12GiB").
    /// </summary>
    public static CheckpointPolicy Parse(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        var t = text.Trim().ToLowerInvariant();
        switch (t)
        {
            case "none" or "false" or "0": return None;
            case "all" or "true" or "1": return All;
            case "offload": return Offload;
        }
        if (!t.StartsWith("budget:", StringComparison.Ordinal))
            throw new FormatException($"checkpoint policy '{text}': expected none, all, offload, or budget:SIZE[,no-offload] (e.g. budget:12GiB)");
        var parts = t["budget:".Length..].Split(',');
        var allow = true;
        if (parts.Length == 2 && parts[1] == "no-offload") allow = false;
        else if (parts.Length != 1) throw new FormatException($"checkpoint policy '{text}': after the size only ',no-offload' may follow");
        return Budget(ParseSize(parts[0], text), allow);
    }

    private static long ParseSize(string s, string text)
    {
        var (digits, scale) = s.EndsWith("gib") ? (s[..^3], 1L << 30) : s.EndsWith("mib") ? (s[..^3], 1L << 20)
            : s.EndsWith("kib") ? (s[..^3], 1L << 10) : (s, 1L);
        if (!double.TryParse(digits, NumberStyles.Float, CultureInfo.InvariantCulture, out var v) || !double.IsFinite(v))
            throw new FormatException($"checkpoint policy '{text}': '{s}' is not a size (bytes, or a number with KiB, MiB or GiB)");
        if (v < 0)
            throw new ArgumentOutOfRangeException(nameof(text), text,
                "the activation memory budget must be zero or more bytes (0 = keep nothing on the device); for no limit use none");
        return (long)Math.Round(v * scale);
    }
}

using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// libtorch's own grouped-query attention: aten::scaled_dot_product_attention with enable_gqa, k and v with fewer heads
/// than q and never repeated. TorchSharp 0.107's binding does not pass enable_gqa on, so the op is reached through a
/// TorchScript compilation unit (torch.jit.compile of one-line functions that call it): libtorch's own dispatch and
/// autograd, errors (shapes, CUDA out of memory) back as .NET exceptions, not through a hand-made C++ call.
/// On CUDA SDPA's backends take the grouped heads themselves (cuDNN: measured on an H200 with PyTorch 2.11, llama-1b's
/// 4×2048 tokens, 32/8 heads: forward + backward 801 µs against 935 µs for repeated k and v, and the same output bits);
/// on the CPU the math backend repeats them inside the op.
/// LORAHUB_SDPA_NATIVE_GQA=0 turns it off (the repeat, or the split of <see cref="torchx.nn.functional.Fused.Gqa"/>); a
/// libtorch whose TorchScript does not know enable_gqa turns it off too (<see cref="Failure"/>).
/// </summary>
internal static class NativeGqaAttention
{
    // The one op, causal or not; the mask-free calls only (masked attention builds per-shape plans and stays as it is).
    private const string Script = """
        def causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return torch.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def full(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return torch.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        """;

    private static readonly Lazy<(torch.jit.CompilationUnit? Unit, string? Failure)> compiled = new(Compile);

    private static long calls;

    /// <summary>Whether grouped-query attention may take this path (default on; LORAHUB_SDPA_NATIVE_GQA=0: off).</summary>
    public static bool Enabled { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_SDPA_NATIVE_GQA")?.Trim() != "0";

    /// <summary>Whether the path is on and the script compiled against the loaded libtorch.</summary>
    public static bool Available => Enabled && compiled.Value.Unit is not null;

    /// <summary>Why the script did not compile (null: it did, or was not tried).</summary>
    public static string? Failure => compiled.IsValueCreated ? compiled.Value.Failure : null;

    /// <summary>Calls that took this path so far (tests: a silent fallback must not pass).</summary>
    public static long Calls => Interlocked.Read(ref calls);

    /// <summary>
    /// softmax(q·kᵀ/√d)·v with k and v's heads each serving heads(q)/heads(k) query heads, causal or not, without mask or
    /// dropout; null where the path is off or unavailable (the caller repeats k and v then). Shapes are the caller's to check.
    /// </summary>
    public static Tensor? TryAttend(Tensor q, Tensor k, Tensor v, bool causal)
    {
        if (!Available) return null;
        var result = compiled.Value.Unit!.invoke<Tensor>(causal ? "causal" : "full", q, k, v);
        Interlocked.Increment(ref calls);
        return result;
    }

    private static (torch.jit.CompilationUnit?, string?) Compile()
    {
        try
        {
            return (torch.jit.compile(Script + "\n"), null); // TorchScript wants the last line ended
        }
        catch (Exception e)
        {
            return (null, e.Message.Split('\n')[0]);
        }
    }
}

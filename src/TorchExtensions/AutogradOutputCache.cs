using System.Reflection;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// Frees the empty_like copy of every output that TorchSharp's custom-function node keeps for the life of the graph
/// (it only serves to materialise zero gradients for outputs that got none). For an activation-sized output — a
/// checkpointed decoder layer, a fused norm — that copy costs as much memory as the output itself.
/// Usage: call <see cref="ReleaseAfterApply"/> on the context inside <c>forward</c>, and pass the result of
/// <c>apply(...)</c> through <see cref="Flush{T}"/>. The function's <c>backward</c> must then accept an undefined
/// gradient (<c>grad.IsInvalid</c>) as zeros.
/// </summary>
public static class AutogradOutputCache
{
    private const BindingFlags Private = BindingFlags.Instance | BindingFlags.NonPublic;
    private static readonly FieldInfo? NodeField = typeof(autograd.AutogradContext).GetField("_node", Private);

    [ThreadStatic] private static List<autograd.AutogradContext>? pending;

    /// <summary>Marks the context's node for release by the next <see cref="Flush{T}"/> on this thread (call inside forward).</summary>
    public static void ReleaseAfterApply(this autograd.AutogradContext ctx) => (pending ??= []).Add(ctx);

    /// <summary>Releases the output caches of the nodes marked on this thread whose apply has finished; returns <paramref name="result"/>.</summary>
    public static T Flush<T>(T result)
    {
        if (pending is not { Count: > 0 } list) return result;
        for (var i = list.Count - 1; i >= 0; i--)
        {
            var node = NodeField?.GetValue(list[i]);
            if (node is null) { list.RemoveAt(i); continue; }
            var cacheField = node.GetType().GetField("_outputCache", Private);
            if (cacheField?.GetValue(node) is not List<Tensor> cache) continue; // an outer apply still running: its cache comes later
            for (var k = 0; k < cache.Count; k++)
            {
                cache[k]?.Dispose();
                cache[k] = null!;
            }
            list.RemoveAt(i);
        }
        return result;
    }

    /// <summary>True when this TorchSharp build still has the private fields the release relies on (a test checks it).</summary>
    public static bool Supported =>
        NodeField is not null &&
        typeof(autograd.AutogradContext).Assembly.GetTypes().Any(t => t.Name == "Node`1" && t.GetField("_outputCache", Private) is not null);
}

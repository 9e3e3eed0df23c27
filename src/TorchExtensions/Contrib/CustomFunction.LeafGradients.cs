using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// Gradients of leaf inputs (parameters) that backward writes into their .grad itself. libtorch's AccumulateGrad takes a
/// gradient as the parameter's .grad without a copy only when it holds the last reference to it, and LibTorchSharp's node
/// copies the handles <see cref="backward"/> returns while ours stay alive until after AccumulateGrad has run: so every
/// parameter gradient a custom function made was cloned (one llama-1b LoRA step: 224 device copies, DoRA 336, full
/// fine-tuning the tied embedding's 525 MB). Inside <see cref="AccumulateLeafGradients"/> backward does what
/// AccumulateGrad would — the leaf's .grad becomes the gradient, or the gradient is added to the one there — and hands
/// libtorch none for that input.
/// <para>
/// Only where AccumulateGrad would run: not under create_graph, and not for torch.autograd.grad, which reads the
/// gradients arriving at the leaves instead of accumulating them; since a node cannot tell the two apart, it happens only
/// inside the scope, which the trainer opens around its backward() (an autograd.grad inside the scope would miss these
/// leaves). A gradient is taken only if it is contiguous, of the leaf's dtype, shape and device, and shares no memory with
/// the incoming gradients, another returned one or what the inputs held in forward (otherwise AccumulateGrad's copy is
/// what keeps them apart; a gradient made in forward and saved for backward is taken). LORAHUB_LEAF_GRADIENTS=0 turns it
/// off.
/// </para>
/// </summary>
public abstract partial class CustomFunction
{
    private static int leafScopes;
    private static long leafWrites;
    private Tensor?[] leaves = [];
    private (long start, long end)[] inputExtents = [];

    /// <summary>Whether backward may write leaf gradients itself inside <see cref="AccumulateLeafGradients"/> (default on; LORAHUB_LEAF_GRADIENTS=0: off).</summary>
    public static bool LeafGradients { get; set; } = Environment.GetEnvironmentVariable("LORAHUB_LEAF_GRADIENTS")?.Trim() != "0";

    /// <summary>Gradients written into leaves' .grad by custom functions so far (tests and reports).</summary>
    public static long LeafGradientWrites => Interlocked.Read(ref leafWrites);

    /// <summary>
    /// A scope for one backward() that only accumulates into .grad (a training step's): until it is disposed, custom
    /// functions write their leaf inputs' gradients into .grad themselves. Process-wide (backward runs on libtorch's
    /// threads); scopes nest.
    /// </summary>
    public static IDisposable AccumulateLeafGradients()
    {
        Interlocked.Increment(ref leafScopes);
        return new LeafScope();
    }

    private sealed class LeafScope : IDisposable
    {
        private int disposed;

        public void Dispose()
        {
            if (Interlocked.Exchange(ref disposed, 1) == 0) Interlocked.Decrement(ref leafScopes);
        }
    }

    // In apply: our own handles to the leaf inputs that take a gradient (contiguous() of a contiguous tensor is the tensor
    // itself, not a view, so a .grad set through the handle is the leaf's), and where every input's memory lies.
    private void KeepLeaves(Tensor?[] inputs)
    {
        leaves = new Tensor?[inputs.Length];
        if (!LeafGradients) return;
        for (var i = 0; i < inputs.Length; i++)
            if (needsGrad[i] && inputs[i] is { is_leaf: true } t && t.is_contiguous())
                leaves[i] = t.contiguous().DetachFromDisposeScope();
        if (leaves.Any(l => l is not null))
            inputExtents = inputs.Where(t => t is { IsInvalid: false } && t.numel() > 0).Select(t => Extent(t!)).ToArray();
    }

    private void ReleaseLeaves()
    {
        foreach (var t in leaves) t?.Dispose();
        leaves = [];
        inputExtents = [];
    }

    // In backward, inside the scope: accumulates g into input i's .grad where it may (see the class remarks); false: the
    // gradient goes to libtorch as usual.
    private bool IntoLeaf(int i, Tensor g, Tensor[] incoming, Tensor?[] result)
    {
        if (i >= leaves.Length || leaves[i] is not { IsInvalid: false } leaf || g.dtype != leaf.dtype || !g.shape.SequenceEqual(leaf.shape)
            || !g.is_contiguous() || !torchx.same_device(g, leaf) || g.numel() == 0)
            return false;
        var own = Extent(g);
        if (inputExtents.Any(e => Overlap(own, e))) return false;
        foreach (var t in incoming.Concat(result.Where((_, j) => j != i)))
            if (t is { IsInvalid: false } && t.numel() > 0 && Overlap(own, Extent(t)))
                return false;
        using (var current = leaf.grad)
        {
            if (current is null) leaf.grad = g;
            else current.add_(g);
        }
        Interlocked.Increment(ref leafWrites);
        return true;
    }

    // The bytes a tensor's elements span (its strides may leave gaps; this is their hull).
    private static (long start, long end) Extent(Tensor t)
    {
        long span = 1;
        for (var d = 0; d < t.dim(); d++) span += (t.size(d) - 1) * Math.Abs(t.stride(d));
        var start = (long)torchx.data_ptr(t);
        return (start, start + span * t.ElementSize);
    }

    private static bool Overlap((long start, long end) a, (long start, long end) b) => a.start < b.end && b.start < a.end;
}

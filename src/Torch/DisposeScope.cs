namespace LoRAHub.Torch;

/// <summary>
/// Collects every tensor created on this thread while it is the innermost scope and frees them when disposed,
/// so a training step needs no hand-written Dispose calls. Keep a result alive with
/// <see cref="Tensor.MoveToOuterDisposeScope"/> or <see cref="Tensor.DetachFromDisposeScope"/> (TorchSharp's names).
/// </summary>
public sealed class DisposeScope : IDisposable
{
    [ThreadStatic] private static DisposeScope? current;

    private readonly List<Tensor> tensors = new();
    private bool disposed;

    internal DisposeScope(DisposeScope? outer) => Outer = outer;

    /// <summary>The innermost open scope on this thread, or null.</summary>
    public static DisposeScope? Current => current;

    public DisposeScope? Outer { get; }

    /// <summary>Number of tensors this scope still owns.</summary>
    public int Count
    {
        get
        {
            var n = 0;
            foreach (var t in tensors) if (t.OwningScope == this && !t.IsInvalid) n++;
            return n;
        }
    }

    internal static DisposeScope Open()
    {
        var scope = new DisposeScope(current);
        current = scope;
        return scope;
    }

    internal void Attach(Tensor t)
    {
        t.OwningScope = this;
        tensors.Add(t);
    }

    /// <summary>Frees all tensors the scope still owns, except those listed.</summary>
    public void DisposeEverythingBut(params Tensor[] keep)
    {
        foreach (var t in tensors)
            if (t.OwningScope == this && Array.IndexOf(keep, t) < 0) t.Dispose();
        tensors.RemoveAll(t => t.IsInvalid || t.OwningScope != this);
    }

    public void Dispose()
    {
        if (disposed) return;
        disposed = true;
        foreach (var t in tensors)
            if (t.OwningScope == this) t.Dispose();
        tensors.Clear();
        // Scopes close innermost first; tolerate out-of-order disposal by unwinding to this scope's outer.
        if (current == this) current = Outer;
    }
}

using System.Runtime.InteropServices;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>
/// A custom autograd function (PyTorch's torch.autograd.Function) for ops whose forward and backward are our own code,
/// e.g. CUDA kernels on raw pointers. Subclass it, keep what backward needs in fields (<see cref="save"/> for tensors),
/// and call <see cref="apply"/> on a new instance per call.
/// </summary>
/// <remarks>
/// Built directly on the autograd-node functions LibTorchSharp exports (the ones TorchSharp's own
/// <c>torch.autograd.Function</c> uses) because that class costs memory and frees late: it keeps an <c>empty_like</c> of
/// every output for the graph's life, leaves the gradients it hands to libtorch to the GC finalizer, and keeps saved
/// tensors until the graph dies. Here:
/// <list type="bullet">
/// <item>Undefined output gradients become zeros from the outputs' recorded shape (no cached tensor).</item>
/// <item>Backward runs on libtorch's autograd thread (the device thread on CUDA), outside the caller's dispose scopes:
/// incoming gradients and temporaries are freed when it returns; the handles of the returned gradients (libtorch has
/// taken its own references by then) at the start of the next backward call on that thread, or when the node dies.</item>
/// <item>Saved tensors are freed right after backward (as libtorch's release_variables does without retain_graph), or
/// when the graph is freed without backward. A second backward through the same node therefore fails clearly.</item>
/// <item>An exception in <see cref="backward"/> cannot cross into libtorch's engine: it is kept, and backward returns a
/// gradient on the meta device, which makes libtorch fail that backward() call; <see cref="TorchErrors.Translate"/> (or
/// <see cref="torchx.Guard(Action)"/> around backward()) then gives a <see cref="TorchException"/> whose inner
/// exception is the original one.</item>
/// <item>Outputs keep no reference to the function except through their grad_fn; save outputs through
/// <see cref="save"/> (which detaches them) so the node and its outputs do not keep each other alive.</item>
/// </list>
/// </remarks>
public abstract unsafe partial class CustomFunction
{
    private static readonly HashSet<CustomFunction> alive = new();
    private static readonly object disposeGate = new();
    [ThreadStatic] private static List<Returned>? returnedOnThisThread;

    private readonly List<Tensor> saved = new();
    private bool[] needsGrad = [];
    private bool[] present = [];
    private (long[] shape, ScalarType dtype, Device device)[] inputMeta = [];
    private (long[] shape, ScalarType dtype, Device device)[] outputMeta = [];
    private NodePtr node;
    private ApplyCallback? applyCallback;
    private DeleteCallback? deleteCallback;
    private readonly List<Returned> returned = new();
    private bool released;

    /// <summary>The function's name, in error messages.</summary>
    protected abstract string name { get; }

    /// <summary>
    /// Computes the outputs (new tensors) from the inputs (null where an optional input is absent). Runs under no_grad,
    /// inside a dispose scope that frees its temporaries; keep tensors for backward with <see cref="save"/>.
    /// </summary>
    protected abstract Tensor[] forward(Tensor?[] inputs);

    /// <summary>
    /// One gradient per input (null for none; ignored for inputs that need none) from one gradient per output (zeros
    /// where an output got none). Runs under no_grad inside a dispose scope; the returned tensors are kept.
    /// </summary>
    protected abstract Tensor?[] backward(Tensor[] grad_outputs);

    /// <summary>Whether input <paramref name="index"/> takes a gradient (it requires grad and grad mode was on in apply).</summary>
    protected bool needs_input_grad(int index) => index < needsGrad.Length && needsGrad[index];

    /// <summary>Keeps a tensor for backward (a detached alias, outside every dispose scope) until backward has run.</summary>
    protected Tensor save(Tensor tensor)
    {
        var t = tensor.detach().DetachFromDisposeScope();
        saved.Add(t);
        return t;
    }

    /// <summary>Frees what forward kept for backward; called after backward, or when the graph dies without one.</summary>
    protected virtual void release()
    {
    }

    /// <summary>
    /// Runs the function and, where grad mode is on and an input requires grad, records it in the autograd graph.
    /// The outputs belong to the caller's dispose scope, as any op's.
    /// </summary>
    public Tensor[] apply(params Tensor?[] inputs)
    {
        present = inputs.Select(t => t is not null && !t.IsInvalid).ToArray();
        var gradMode = is_grad_enabled();
        needsGrad = inputs.Select((t, i) => present[i] && gradMode && t!.requires_grad).ToArray();
        inputMeta = inputs.Select((t, i) => present[i] ? (t!.shape, t.dtype, t.device) : ([], ScalarType.Float32, CPU)).ToArray();
        if (!needsGrad.Any(b => b))
        {
            try
            {
                using var scope = NewDisposeScope();
                using var noGrad = no_grad();
                var outputs = forward(inputs);
                foreach (var o in outputs) o.MoveToOuterDisposeScope();
                return outputs;
            }
            finally
            {
                Release();
            }
        }
        var vars = inputs.Where((_, i) => present[i]).Select(t => t!.Handle).ToArray();
        KeepLeaves(inputs);
        applyCallback = Apply;
        deleteCallback = Delete;
        lock (alive) alive.Add(this);
        node = Native.THSAutograd_CSharpNode_ctor(Marshal.GetFunctionPointerForDelegate(applyCallback),
            Marshal.GetFunctionPointerForDelegate(deleteCallback));
        torch.CheckForErrors();
        try
        {
            fixed (IntPtr* v = vars)
            {
                Native.THSAutograd_CSharpNode_setNextEdges(node, new ArrayWithSize { Array = (IntPtr)v, Size = vars.Length }, true);
                torch.CheckForErrors();
                Native.THSAutograd_CSharpNode_clearInputMetadata(node);
                torch.CheckForErrors();
                using var scope = NewDisposeScope();
                Tensor[] outputs;
                using (no_grad()) outputs = forward(inputs);
                outputMeta = outputs.Select(o => (o.shape, o.dtype, o.device)).ToArray();
                var outs = outputs.Select(o => o.Handle).ToArray();
                fixed (IntPtr* o = outs)
                {
                    var empty = new ArrayWithSize();
                    wrapped = null;
                    Native.THSAutograd_Function_wrapOutputs(new ArrayWithSize { Array = (IntPtr)v, Size = vars.Length }, empty, empty,
                        new ArrayWithSize { Array = (IntPtr)o, Size = outs.Length }, node, (IntPtr)(delegate* unmanaged[Cdecl]<nuint, IntPtr*>)&Allocate);
                    torch.CheckForErrors();
                }
                var handles = TakeWrapped(outs.Length);
                var result = handles.Select(h => Tensor.UnsafeCreateTensor(h).MoveToOuterDisposeScope()).ToArray();
                return result;
            }
        }
        finally
        {
            // From here on the graph owns the node through the outputs' grad_fn (or, on failure, nobody: it is deleted now).
            Native.THSAutograd_CSharpNode_disposeSharedPtr(node);
            node.SharedPtr = IntPtr.Zero;
        }
    }

    // ---------------------------------------------------------------- callbacks from libtorch

    private ArrayWithSize Apply(IntPtr* tensors, int size)
    {
        FlushReturnedOnThisThread();
        var count = present.Count(p => p);
        try
        {
            if (released)
                throw new InvalidOperationException(
                    $"{name}: backward ran twice through the same graph; its saved tensors were freed after the first (retain_graph is not supported)");
            // Grad mode here is create_graph's: leaves take their gradients directly only without it.
            var toLeaves = Volatile.Read(ref leafScopes) > 0 && !is_grad_enabled();
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            var grads = new Tensor[size];
            for (var i = 0; i < size; i++)
                grads[i] = tensors[i] != IntPtr.Zero
                    ? Tensor.UnsafeCreateTensor(tensors[i])
                    : zeros(outputMeta[i].shape, outputMeta[i].dtype, outputMeta[i].device);
            var result = backward(grads);
            var keep = new List<Tensor>();
            var handles = new IntPtr[count];
            for (int i = 0, k = 0; i < present.Length; i++)
            {
                if (!present[i]) continue;
                var g = i < result.Length ? result[i] : null;
                if (g is not null && !g.IsInvalid && needsGrad[i] && !(toLeaves && IntoLeaf(i, g, grads, result)))
                {
                    keep.Add(g.DetachFromDisposeScope());
                    handles[k] = g.Handle;
                }
                k++;
            }
            return Hand(keep, handles);
        }
        catch (Exception e)
        {
            return Fail(e, count);
        }
        finally
        {
            Release();
        }
    }

    // The handles must outlive this call (libtorch copies them after it returns): they are freed later.
    private ArrayWithSize Hand(List<Tensor> keep, IntPtr[] handles)
    {
        var array = (IntPtr*)NativeMemory.Alloc((nuint)Math.Max(1, handles.Length), (nuint)sizeof(IntPtr));
        for (var i = 0; i < handles.Length; i++) array[i] = handles[i];
        var r = new Returned(keep, (IntPtr)array);
        lock (disposeGate) returned.Add(r);
        (returnedOnThisThread ??= new()).Add(r);
        return new ArrayWithSize { Array = (IntPtr)array, Size = handles.Length };
    }

    // A gradient on the meta device for an input that needs one: libtorch's engine rejects it and fails backward().
    private ArrayWithSize Fail(Exception e, int count)
    {
        CheckpointFailures.Record(new InvalidOperationException($"backward of {name} failed: {e.Message}", e));
        try
        {
            var handles = new IntPtr[count];
            var keep = new List<Tensor>();
            for (int i = 0, k = 0; i < present.Length; i++)
            {
                if (!present[i]) continue;
                if (needsGrad[i] && keep.Count == 0)
                {
                    var bad = empty(inputMeta[i].shape, inputMeta[i].dtype, META).DetachFromDisposeScope();
                    keep.Add(bad);
                    handles[k] = bad.Handle;
                }
                k++;
            }
            return Hand(keep, handles);
        }
        catch
        {
            return new ArrayWithSize();
        }
    }

    private void Delete()
    {
        try
        {
            Release();
            lock (disposeGate)
            {
                foreach (var r in returned) r.Free();
                returned.Clear();
            }
            if (node.WeakPtr != IntPtr.Zero) Native.THSAutograd_CSharpNode_disposeWeakPtr(node);
            node.WeakPtr = IntPtr.Zero;
        }
        catch
        {
            // Nothing may escape into libtorch; the memory is reclaimed by the finalizers instead.
        }
        finally
        {
            lock (alive) alive.Remove(this);
        }
    }

    private void Release()
    {
        if (released) return;
        released = true;
        try
        {
            release();
        }
        finally
        {
            foreach (var t in saved) t.Dispose();
            saved.Clear();
            ReleaseLeaves();
        }
    }

    private static void FlushReturnedOnThisThread()
    {
        if (returnedOnThisThread is not { Count: > 0 } list) return;
        lock (disposeGate)
            foreach (var r in list) r.Free();
        list.Clear();
    }

    /// <summary>Gradients handed to libtorch by one backward call, and the array that carried their handles.</summary>
    private sealed class Returned(List<Tensor> tensors, IntPtr array)
    {
        private bool freed;

        public void Free()
        {
            if (freed) return;
            freed = true;
            foreach (var t in tensors) t.Dispose();
            NativeMemory.Free((void*)array);
        }
    }

    // ---------------------------------------------------------------- LibTorchSharp's autograd-node exports

    [ThreadStatic] private static IntPtr* wrapped;
    [ThreadStatic] private static nuint wrappedLength;

    [UnmanagedCallersOnly(CallConvs = [typeof(System.Runtime.CompilerServices.CallConvCdecl)])]
    private static IntPtr* Allocate(nuint length)
    {
        wrapped = (IntPtr*)NativeMemory.AllocZeroed(Math.Max(length, 1), (nuint)sizeof(IntPtr));
        wrappedLength = length;
        return wrapped;
    }

    private static IntPtr[] TakeWrapped(int expected)
    {
        if (wrapped == null || (int)wrappedLength != expected)
            throw new InvalidOperationException("libtorch did not wrap the custom function's outputs");
        var result = new IntPtr[expected];
        for (var i = 0; i < expected; i++) result[i] = wrapped[i];
        NativeMemory.Free(wrapped);
        wrapped = null;
        return result;
    }

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    private delegate ArrayWithSize ApplyCallback(IntPtr* tensors, int size);

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    private delegate void DeleteCallback();

    [StructLayout(LayoutKind.Sequential)]
    private struct ArrayWithSize
    {
        public IntPtr Array;
        public long Size;
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct NodePtr
    {
        public IntPtr SharedPtr;
        public IntPtr WeakPtr;
    }

    private static class Native
    {
        [DllImport("LibTorchSharp")]
        public static extern NodePtr THSAutograd_CSharpNode_ctor(IntPtr applyFunc, IntPtr managedDeleteNode);

        [DllImport("LibTorchSharp")]
        public static extern void THSAutograd_CSharpNode_disposeSharedPtr(NodePtr node);

        [DllImport("LibTorchSharp")]
        public static extern void THSAutograd_CSharpNode_disposeWeakPtr(NodePtr node);

        [DllImport("LibTorchSharp")]
        public static extern void THSAutograd_CSharpNode_setNextEdges(NodePtr node, ArrayWithSize vars, [MarshalAs(UnmanagedType.U1)] bool isExecutable);

        [DllImport("LibTorchSharp")]
        public static extern void THSAutograd_CSharpNode_clearInputMetadata(NodePtr node);

        [DllImport("LibTorchSharp")]
        public static extern void THSAutograd_Function_wrapOutputs(ArrayWithSize vars, ArrayWithSize nonDiff, ArrayWithSize dirty,
            ArrayWithSize outputs, NodePtr node, IntPtr allocator);
    }
}

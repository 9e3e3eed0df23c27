using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace LoRAHub.Torch;

/// <summary>
/// A libtorch tensor. Owns one native handle, freed by <see cref="Dispose"/>, by the enclosing
/// <see cref="DisposeScope"/>, or at worst by the finalizer.
/// </summary>
public sealed unsafe partial class Tensor : IDisposable
{
    private IntPtr handle;

    internal Tensor(IntPtr handle)
    {
        this.handle = Native.Check(handle);
        DisposeScope.Current?.Attach(this);
    }

    ~Tensor()
    {
        var h = Interlocked.Exchange(ref handle, IntPtr.Zero);
        if (h != IntPtr.Zero) Native.lh_tensor_free(h);
    }

    internal DisposeScope? OwningScope { get; set; }

    /// <summary>True once the native tensor has been freed.</summary>
    public bool IsInvalid => handle == IntPtr.Zero;

    internal IntPtr Handle
    {
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        get
        {
            var h = handle;
            if (h == IntPtr.Zero) ThrowDisposed();
            return h;
        }
    }

    private static void ThrowDisposed() =>
        throw new ObjectDisposedException(nameof(Tensor), "This tensor was already disposed (directly or by its DisposeScope). " +
            "Call MoveToOuterDisposeScope() or DetachFromDisposeScope() on tensors that must outlive a scope.");

    public void Dispose()
    {
        var h = Interlocked.Exchange(ref handle, IntPtr.Zero);
        if (h != IntPtr.Zero) Native.lh_tensor_free(h);
        OwningScope = null;
        GC.SuppressFinalize(this);
    }

    /// <summary>Hands the tensor to the scope outside the current one (or to no scope).</summary>
    public Tensor MoveToOuterDisposeScope()
    {
        var outer = OwningScope?.Outer;
        OwningScope = null;
        outer?.Attach(this);
        return this;
    }

    /// <summary>Removes the tensor from every dispose scope; the caller owns it now.</summary>
    public Tensor DetachFromDisposeScope()
    {
        OwningScope = null;
        return this;
    }

    // ---- metadata ----

    public int dim() => Native.lh_tensor_dim(Handle);
    public int ndim => dim();
    public long numel() => Native.lh_tensor_numel(Handle);
    public ScalarType dtype => (ScalarType)Native.lh_tensor_dtype(Handle);
    public long element_size() => Native.lh_tensor_element_size(Handle);
    public bool is_contiguous() => Native.lh_tensor_is_contiguous(Handle) != 0;
    public Device device => new((DeviceType)Native.lh_tensor_device_type(Handle), Native.lh_tensor_device_index(Handle));
    public bool is_cuda => Native.lh_tensor_device_type(Handle) == 1;

    /// <summary>An id of the underlying storage: equal for views of the same memory.</summary>
    public long StorageId => Native.lh_tensor_storage_id(Handle);

    public long[] shape
    {
        get
        {
            var h = Handle;
            var n = Native.lh_tensor_dim(h);
            var result = new long[n];
            fixed (long* p = result) Native.lh_tensor_sizes(h, p);
            return result;
        }
    }

    public long[] stride()
    {
        var h = Handle;
        var result = new long[Native.lh_tensor_dim(h)];
        fixed (long* p = result) Native.lh_tensor_strides(h, p);
        return result;
    }

    /// <summary>Size of one dimension; negative counts from the end.</summary>
    public long size(int dimension)
    {
        var s = shape;
        var d = dimension < 0 ? dimension + s.Length : dimension;
        if (d < 0 || d >= s.Length)
            throw new IndexOutOfRangeException($"dimension {dimension} is out of range for a tensor with {s.Length} dimensions");
        return s[d];
    }

    public string ShapeString => "[" + string.Join(", ", shape) + "]";

    public override string ToString() =>
        IsInvalid ? "Tensor(disposed)" : $"Tensor{ShapeString} {dtype.ToTorchName()} {device}";

    /// <summary>libtorch's printout of the values (like Python's print(t)).</summary>
    public string str()
    {
        var s = Native.Check(Native.lh_tensor_to_string(Handle));
        try { return Marshal.PtrToStringUTF8(s) ?? ""; }
        finally { Native.lh_free_string(s); }
    }

    // ---- data in and out ----

    /// <summary>Copies the elements, row-major, into host memory (any device, any layout).</summary>
    public void CopyTo(Span<byte> destination)
    {
        var nbytes = numel() * element_size();
        if (destination.Length != nbytes)
            throw new ArgumentException($"destination has {destination.Length} bytes but {this} needs {nbytes}");
        fixed (byte* p = destination) Native.Check(Native.lh_copy_to_buffer(Handle, p, nbytes));
    }

    /// <summary>The elements as a new array; T must match the dtype's element size and kind.</summary>
    public T[] data<T>() where T : unmanaged
    {
        CheckElementType<T>();
        var result = new T[numel()];
        CopyTo(MemoryMarshal.AsBytes(result.AsSpan()));
        return result;
    }

    public T[] ToArray<T>() where T : unmanaged => data<T>();

    /// <summary>The single value of a one-element tensor, converted to T.</summary>
    public T item<T>() where T : unmanaged
    {
        if (typeof(T) == typeof(long) || typeof(T) == typeof(int) || typeof(T) == typeof(bool) || typeof(T) == typeof(byte))
        {
            long v;
            Native.Check(Native.lh_item_long(Handle, &v));
            if (typeof(T) == typeof(long)) return (T)(object)v;
            if (typeof(T) == typeof(int)) return (T)(object)checked((int)v);
            if (typeof(T) == typeof(bool)) return (T)(object)(v != 0);
            return (T)(object)checked((byte)v);
        }
        double d;
        Native.Check(Native.lh_item_double(Handle, &d));
        if (typeof(T) == typeof(double)) return (T)(object)d;
        if (typeof(T) == typeof(float)) return (T)(object)(float)d;
        if (typeof(T) == typeof(Half)) return (T)(object)(Half)d;
        throw new NotSupportedException($"item<{typeof(T).Name}>() is not supported");
    }

    public double ToDouble() => item<double>();
    public float ToSingle() => item<float>();
    public long ToInt64() => item<long>();

    private void CheckElementType<T>() where T : unmanaged
    {
        var t = dtype;
        var ok = typeof(T) == typeof(float) ? t == ScalarType.Float32
            : typeof(T) == typeof(double) ? t == ScalarType.Float64
            : typeof(T) == typeof(long) ? t == ScalarType.Int64
            : typeof(T) == typeof(int) ? t == ScalarType.Int32
            : typeof(T) == typeof(short) ? t == ScalarType.Int16
            : typeof(T) == typeof(sbyte) ? t == ScalarType.Int8
            : typeof(T) == typeof(byte) ? t is ScalarType.Byte or ScalarType.Bool
            : typeof(T) == typeof(bool) ? t == ScalarType.Bool
            : typeof(T) == typeof(Half) ? t == ScalarType.Float16
            : typeof(T) == typeof(ushort) ? t is ScalarType.BFloat16 or ScalarType.Float16
            : false;
        if (!ok)
            throw new ArgumentException($"cannot read a {t.ToTorchName()} tensor as {typeof(T).Name}; convert it first with .to(dtype)");
    }

    // ---- autograd ----

    public bool requires_grad
    {
        get => Native.lh_requires_grad(Handle) != 0;
        set => Native.Check(Native.lh_set_requires_grad(Handle, value ? 1 : 0));
    }

    public Tensor requires_grad_(bool value = true)
    {
        requires_grad = value;
        return this;
    }

    public bool is_leaf => Native.lh_is_leaf(Handle) != 0;

    public void retain_grad() => Native.Check(Native.lh_retain_grad(Handle));

    /// <summary>The accumulated gradient (a new handle each call), or null when there is none.</summary>
    public Tensor? grad
    {
        get
        {
            IntPtr g;
            Native.Check(Native.lh_grad(Handle, &g));
            return g == IntPtr.Zero ? null : new Tensor(g);
        }
        set => Native.Check(Native.lh_set_grad(Handle, value?.Handle ?? IntPtr.Zero));
    }

    public void backward(Tensor? gradient = null, bool retain_graph = false) =>
        Native.Check(Native.lh_backward(Handle, gradient?.Handle ?? IntPtr.Zero, retain_graph ? 1 : 0));

    public Tensor detach() => Unary(UnaryOp.Detach);
    public Tensor detach_()
    {
        Native.Check(Native.lh_unary_((int)UnaryOp.Detach, Handle));
        return this;
    }

    /// <summary>Replaces the data in place, keeping this object and its autograd identity (PyTorch's <c>p.data = x</c>).</summary>
    public void set_data(Tensor source) => Native.Check(Native.lh_set_data(Handle, source.Handle));

    /// <summary>A second handle to the same tensor (shares storage and autograd identity).</summary>
    public Tensor alias() => new(Native.lh_alias(Handle));
}

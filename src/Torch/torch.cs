using System.Runtime.InteropServices;

namespace LoRAHub.Torch;

/// <summary>The entry point, named as in PyTorch and TorchSharp: torch.zeros, torch.cat, torch.no_grad, ...</summary>
public static unsafe partial class torch
{
    public const ScalarType float32 = ScalarType.Float32;
    public const ScalarType float16 = ScalarType.Float16;
    public const ScalarType bfloat16 = ScalarType.BFloat16;
    public const ScalarType float64 = ScalarType.Float64;
    public const ScalarType int64 = ScalarType.Int64;
    public const ScalarType int32 = ScalarType.Int32;
    public const ScalarType int16 = ScalarType.Int16;
    public const ScalarType int8 = ScalarType.Int8;
    public const ScalarType uint8 = ScalarType.Byte;
    public const ScalarType @bool = ScalarType.Bool;

    public static readonly Device CPU = Device.CPU;
    public static readonly Device CUDA = Device.CUDA;

    public static Device device(string name) => Device.Parse(name);

    /// <summary>The libtorch version the native shim was compiled against.</summary>
    public static string __version__ => Marshal.PtrToStringUTF8(Native.lh_torch_version()) ?? "unknown";

    /// <summary>Number of native tensor handles alive (for leak checks).</summary>
    public static long LiveTensorCount => Native.lh_live_tensors();

    public static DisposeScope NewDisposeScope() => DisposeScope.Open();

    public static void set_num_threads(int n) => Native.lh_set_num_threads(n);
    public static int get_num_threads() => Native.lh_get_num_threads();

    // ---- creation ----

    private static Tensor Create(int kind, long[] shape, ScalarType? dtype, Device? device, bool requires_grad)
    {
        var dev = device ?? Device.CPU;
        fixed (long* p = shape)
            return new(Native.lh_create(kind, p, shape.Length, (int)(dtype ?? ScalarType.Float32), (int)dev.Type, dev.Index, requires_grad ? 1 : 0));
    }

    public static Tensor zeros(long[] shape, ScalarType? dtype = null, Device? device = null, bool requires_grad = false) => Create(0, shape, dtype, device, requires_grad);
    public static Tensor ones(long[] shape, ScalarType? dtype = null, Device? device = null, bool requires_grad = false) => Create(1, shape, dtype, device, requires_grad);
    public static Tensor empty(long[] shape, ScalarType? dtype = null, Device? device = null, bool requires_grad = false) => Create(2, shape, dtype, device, requires_grad);
    public static Tensor randn(long[] shape, ScalarType? dtype = null, Device? device = null, bool requires_grad = false) => Create(3, shape, dtype, device, requires_grad);
    public static Tensor rand(long[] shape, ScalarType? dtype = null, Device? device = null, bool requires_grad = false) => Create(4, shape, dtype, device, requires_grad);
    public static Tensor zeros(params long[] shape) => zeros(shape, null);
    public static Tensor ones(params long[] shape) => ones(shape, null);
    public static Tensor randn(params long[] shape) => randn(shape, null);
    public static Tensor rand(params long[] shape) => rand(shape, null);

    public static Tensor full(long[] shape, double value, ScalarType? dtype = null, Device? device = null, bool requires_grad = false)
    {
        var dev = device ?? Device.CPU;
        fixed (long* p = shape)
            return new(Native.lh_full(p, shape.Length, value, (int)(dtype ?? ScalarType.Float32), (int)dev.Type, dev.Index, requires_grad ? 1 : 0));
    }

    public static Tensor randint(long low, long high, long[] shape, ScalarType dtype = ScalarType.Int64, Device? device = null)
    {
        var dev = device ?? Device.CPU;
        fixed (long* p = shape) return new(Native.lh_randint(low, high, p, shape.Length, (int)dtype, (int)dev.Type, dev.Index));
    }

    public static Tensor randint(long high, long[] shape, ScalarType dtype = ScalarType.Int64, Device? device = null) => randint(0, high, shape, dtype, device);

    public static Tensor arange(double start, double end, double step = 1, ScalarType dtype = ScalarType.Int64, Device? device = null)
    {
        var dev = device ?? Device.CPU;
        return new(Native.lh_arange(start, end, step, (int)dtype, (int)dev.Type, dev.Index));
    }

    public static Tensor arange(long end, ScalarType dtype = ScalarType.Int64, Device? device = null) => arange(0, end, 1, dtype, device);

    public static Tensor linspace(double start, double end, long steps, ScalarType dtype = ScalarType.Float32, Device? device = null)
    {
        var dev = device ?? Device.CPU;
        return new(Native.lh_linspace(start, end, steps, (int)dtype, (int)dev.Type, dev.Index));
    }

    public static Tensor eye(long n, long? m = null, ScalarType dtype = ScalarType.Float32, Device? device = null)
    {
        var dev = device ?? Device.CPU;
        return new(Native.lh_eye(n, m ?? n, (int)dtype, (int)dev.Type, dev.Index));
    }

    public static Tensor zeros_like(Tensor t) => new(Native.lh_like(0, t.Handle));
    public static Tensor ones_like(Tensor t) => new(Native.lh_like(1, t.Handle));
    public static Tensor empty_like(Tensor t) => new(Native.lh_like(2, t.Handle));
    public static Tensor randn_like(Tensor t) => new(Native.lh_like(3, t.Handle));
    public static Tensor rand_like(Tensor t) => new(Native.lh_like(4, t.Handle));
    public static Tensor full_like(Tensor t, double value) => new(Native.lh_full_like(t.Handle, value));

    public static Tensor scalar_tensor(double value, ScalarType dtype = ScalarType.Float32, Device? device = null)
    {
        var dev = device ?? Device.CPU;
        return new(Native.lh_scalar_tensor(value, (int)dtype, (int)dev.Type, dev.Index));
    }

    /// <summary>Copies raw element bytes into a new tensor (any dtype, incl. bfloat16 as raw bits).</summary>
    public static Tensor frombuffer(ReadOnlySpan<byte> data, long[] shape, ScalarType dtype, Device? device = null)
    {
        var dev = device ?? Device.CPU;
        fixed (byte* d = data)
        fixed (long* s = shape)
            return new(Native.lh_from_buffer(d, data.Length, s, shape.Length, (int)dtype, (int)dev.Type, dev.Index));
    }

    /// <summary>A tensor from a flat array; the shape defaults to 1-D.</summary>
    public static Tensor tensor<T>(T[] data, long[]? shape = null, Device? device = null, bool requires_grad = false) where T : unmanaged
    {
        var t = frombuffer(MemoryMarshal.AsBytes(data.AsSpan()), shape ?? [data.Length], DTypeOf<T>(), device);
        if (requires_grad) t.requires_grad = true;
        return t;
    }

    public static Tensor tensor(float value) => tensor(new[] { value }, []);
    public static Tensor tensor(double value) => tensor(new[] { value }, []);
    public static Tensor tensor(long value) => tensor(new[] { value }, []);

    /// <summary>A 2-D tensor from a rectangular array.</summary>
    public static Tensor tensor<T>(T[,] data, Device? device = null) where T : unmanaged
    {
        var flat = new T[data.Length];
        var i = 0;
        foreach (var v in data) flat[i++] = v;
        return tensor(flat, [data.GetLength(0), data.GetLength(1)], device);
    }

    internal static ScalarType DTypeOf<T>() where T : unmanaged =>
        typeof(T) == typeof(float) ? ScalarType.Float32
        : typeof(T) == typeof(double) ? ScalarType.Float64
        : typeof(T) == typeof(long) ? ScalarType.Int64
        : typeof(T) == typeof(int) ? ScalarType.Int32
        : typeof(T) == typeof(short) ? ScalarType.Int16
        : typeof(T) == typeof(sbyte) ? ScalarType.Int8
        : typeof(T) == typeof(byte) ? ScalarType.Byte
        : typeof(T) == typeof(bool) ? ScalarType.Bool
        : typeof(T) == typeof(Half) ? ScalarType.Float16
        : throw new NotSupportedException($"no tensor dtype for {typeof(T).Name}; use frombuffer with an explicit dtype");

    // ---- joining ----

    private static IntPtr[] Handles(IReadOnlyList<Tensor> tensors)
    {
        if (tensors.Count == 0) throw new ArgumentException("expected at least one tensor");
        var result = new IntPtr[tensors.Count];
        for (var i = 0; i < result.Length; i++) result[i] = tensors[i].Handle;
        return result;
    }

    public static Tensor cat(IReadOnlyList<Tensor> tensors, long dim = 0)
    {
        var h = Handles(tensors);
        fixed (IntPtr* p = h) return new(Native.lh_cat(p, h.Length, dim));
    }

    public static Tensor stack(IReadOnlyList<Tensor> tensors, long dim = 0)
    {
        var h = Handles(tensors);
        fixed (IntPtr* p = h) return new(Native.lh_stack(p, h.Length, dim));
    }

    public static Tensor matmul(Tensor a, Tensor b) => a.matmul(b);
    public static Tensor where(Tensor condition, Tensor a, Tensor b) => a.where(condition, b);
    public static Tensor outer(Tensor a, Tensor b) => new(Native.lh_outer(a.Handle, b.Handle));
    public static Tensor maximum(Tensor a, Tensor b) => a.maximum(b);
    public static Tensor minimum(Tensor a, Tensor b) => a.minimum(b);
    public static Tensor exp(Tensor a) => a.exp();
    public static Tensor log(Tensor a) => a.log();
    public static Tensor sqrt(Tensor a) => a.sqrt();
    public static Tensor tril(Tensor a, long diagonal = 0) => a.tril(diagonal);
    public static Tensor triu(Tensor a, long diagonal = 0) => a.triu(diagonal);
    public static Tensor multinomial(Tensor probs, long num_samples, bool replacement = false) =>
        new(Native.lh_multinomial(probs.Handle, num_samples, replacement ? 1 : 0));
    public static bool allclose(Tensor a, Tensor b, double rtol = 1e-5, double atol = 1e-8) => a.allclose(b, rtol, atol);
    public static bool equal(Tensor a, Tensor b) => a.equal(b);

    // ---- randomness ----

    /// <summary>Seeds libtorch's CPU and CUDA generators.</summary>
    public static void manual_seed(long seed) => Native.Check(Native.lh_manual_seed(unchecked((ulong)seed)));

    public static Tensor get_rng_state() => new(Native.lh_cpu_rng_get_state());
    public static void set_rng_state(Tensor state) => Native.Check(Native.lh_cpu_rng_set_state(state.Handle));

    // ---- autograd mode ----

    public static bool is_grad_enabled() => Native.lh_grad_enabled() != 0;
    public static void set_grad_enabled(bool enabled) => Native.lh_set_grad_enabled(enabled ? 1 : 0);

    /// <summary>using (torch.no_grad()) { ... } disables autograd recording on this thread for the block.</summary>
    public static GradModeScope no_grad() => new(false);
    public static GradModeScope enable_grad() => new(true);

    public readonly struct GradModeScope : IDisposable
    {
        private readonly bool previous;

        internal GradModeScope(bool enabled)
        {
            previous = is_grad_enabled();
            set_grad_enabled(enabled);
        }

        public void Dispose() => set_grad_enabled(previous);
    }
}

namespace LoRAHub.TorchExtensions.Cuda;

/// <summary>Grid or block dimensions of a launch.</summary>
public readonly record struct Dim3(uint X, uint Y = 1, uint Z = 1)
{
    public static implicit operator Dim3(int x) => new(checked((uint)x));
    public static implicit operator Dim3(long x) => new(checked((uint)x));
}

/// <summary>A loaded kernel on one device (from <see cref="CudaProgram.Function"/>).</summary>
public sealed class CudaFunction
{
    internal CudaFunction(string name, int device, IntPtr handle)
    {
        Name = name;
        Device = device;
        Handle = handle;
    }

    public string Name { get; }
    public int Device { get; }
    internal IntPtr Handle { get; }

    // Its program was built with dependentLaunch (it waits for the kernel ahead first) and its device is sm_90+: its
    // launches may be dependent ones (DependentLaunch).
    internal bool Dependent { get; init; }

    private int sharedAllowed = 48 * 1024; // what every kernel may take without asking

    /// <summary>
    /// Registers a thread of this kernel holds, as the compiler left it (ptxas: at most the cap its __launch_bounds__ set,
    /// which decides how many blocks fit a multiprocessor).
    /// </summary>
    public int Registers => Attribute(CudaDriver.FuncAttrNumRegs, "its register count");

    /// <summary>
    /// Local memory a thread of this kernel takes, in bytes: registers spilled by the compiler and arrays it could not keep
    /// in registers. A hot kernel wants 0 (each spill is an L1 round trip; Nsight Compute counts them as local requests).
    /// </summary>
    public int LocalBytes => Attribute(CudaDriver.FuncAttrLocalSizeBytes, "its local memory size");

    private unsafe int Attribute(int attribute, string what)
    {
        int value;
        using (CudaDriver.OnDevice(Device))
            CudaDriver.Check(CudaDriver.cuFuncGetAttribute(&value, attribute, Handle), $"reading {what} of {Name}");
        return value;
    }

    /// <summary>
    /// Lets launches of this kernel take <paramref name="bytes"/> of dynamic shared memory (above the default 48 KiB each
    /// kernel must ask for it once; up to the device's opt-in limit, 227 KiB on sm_90). Idempotent and thread-safe; a
    /// request above the device's limit throws a <see cref="TorchException"/> naming the kernel.
    /// </summary>
    public unsafe void AllowDynamicSharedMemory(int bytes)
    {
        if (bytes <= Volatile.Read(ref sharedAllowed)) return;
        lock (this)
        {
            if (bytes <= sharedAllowed) return;
            using (CudaDriver.OnDevice(Device))
                CudaDriver.Check(CudaDriver.cuFuncSetAttribute(Handle, CudaDriver.FuncAttrMaxDynamicSharedSizeBytes, bytes),
                    $"allowing {bytes} B of dynamic shared memory to {Name}");
            Volatile.Write(ref sharedAllowed, bytes);
        }
    }

    /// <summary>
    /// Enqueues the kernel on the legacy default stream of its device (where libtorch computes), so it runs after the
    /// libtorch work that produced its inputs and before the work that reads its outputs. Returns at once; a launch error
    /// (bad configuration, too much shared memory) throws a <see cref="TorchException"/>.
    /// </summary>
    public void Launch(Dim3 grid, Dim3 block, int sharedBytes, KernelArgs args) => Launch(grid, block, sharedBytes, args, CudaDriver.LegacyStream);

    /// <summary>
    /// The same on <paramref name="stream"/> (a stream of its device, e.g. <see cref="CudaStreams.ComputeStream"/>): the
    /// caller orders it against libtorch's work with events (<see cref="CudaStreams.After"/>) and keeps what it reads and
    /// writes alive until it has run.
    /// </summary>
    public unsafe void Launch(Dim3 grid, Dim3 block, int sharedBytes, KernelArgs args, IntPtr stream)
    {
        if (grid.X == 0 || grid.Y == 0 || grid.Z == 0) return;
        fixed (ulong* values = args.Values)
        {
            var pointers = stackalloc void*[Math.Max(1, args.Count)];
            for (var i = 0; i < args.Count; i++) pointers[i] = values + args.Start(i);
            using var _ = CudaDriver.OnDevice(Device);
            int? dependent = null;
            if (Dependent && DependentLaunch.On)
            {
                var attribute = new CudaDriver.LaunchAttribute { Id = CudaDriver.LaunchAttributeProgrammaticStreamSerialization, Value = 1 };
                var config = new CudaDriver.LaunchConfig
                {
                    GridX = grid.X, GridY = grid.Y, GridZ = grid.Z, BlockX = block.X, BlockY = block.Y, BlockZ = block.Z,
                    SharedBytes = (uint)sharedBytes, Stream = stream, Attributes = &attribute, AttributeCount = 1,
                };
                dependent = CudaDriver.cuLaunchKernelEx(&config, Handle, pointers, null);
                if (dependent == CudaDriver.Success) DependentLaunch.Count();
            }
            if (dependent != CudaDriver.Success)
            {
                // A dependent launch that failed is retried plainly: where that works, the driver does not take dependent
                // launches (off from now on); where it fails too, its error is the one to report.
                var status = CudaDriver.cuLaunchKernel(Handle, grid.X, grid.Y, grid.Z, block.X, block.Y, block.Z, (uint)sharedBytes,
                    stream, pointers, null);
                if (dependent is { } refused && status == CudaDriver.Success) DependentLaunch.Refuse(refused);
                CudaDriver.Check(status, $"launching {Name} (grid {grid.X}×{grid.Y}×{grid.Z}, block {block.X}×{block.Y}×{block.Z}, {sharedBytes} B shared)");
            }
        }
        CudaKernels.CountLaunch();
    }
}

/// <summary>
/// Kernel arguments in declaration order, each in an 8-byte slot (the kernel reads as many bytes as its parameter has;
/// x86-64 and ARM64 are little-endian, so a 4-byte int or float sits at the start of its slot), or a struct passed by
/// value in consecutive slots (<see cref="Struct"/>). At most <see cref="MaxCount"/> slots (1 KB: within the 4 KB of
/// parameters every CUDA device takes).
/// </summary>
public sealed class KernelArgs
{
    /// <summary>The most slots one launch takes here.</summary>
    public const int MaxCount = 128;

    internal ulong[] Values = new ulong[32];

    private int[] starts = new int[32];

    /// <summary>Arguments so far.</summary>
    internal int Count { get; private set; }

    /// <summary>Slots so far.</summary>
    internal int Slots { get; private set; }

    /// <summary>The first slot of argument <paramref name="i"/>.</summary>
    internal int Start(int i) => starts[i];

    private KernelArgs Put(ReadOnlySpan<ulong> words)
    {
        if (Slots + words.Length > MaxCount) throw new ArgumentException($"a kernel takes at most {MaxCount} arguments here");
        // Grown for the few kernels with many arguments (a pointer and strides per grouped tensor); most take < 32.
        while (Slots + words.Length > Values.Length) Array.Resize(ref Values, Math.Min(2 * Values.Length, MaxCount));
        if (Count == starts.Length) Array.Resize(ref starts, 2 * starts.Length);
        starts[Count++] = Slots;
        words.CopyTo(Values.AsSpan(Slots));
        Slots += words.Length;
        return this;
    }

    private KernelArgs Put(ulong bits) => Put([bits]);

    /// <summary>
    /// A struct passed by value whose fields are 8-byte aligned: its bytes as 8-byte words in declaration order (two
    /// 4-byte fields share a word, the first in its low half: <see cref="Pair(int, int)"/>; the struct's size a multiple
    /// of 8, trailing padding included).
    /// </summary>
    public KernelArgs Struct(params ulong[] words) =>
        words.Length > 0 ? Put(words) : throw new ArgumentException("a struct argument has at least one word", nameof(words));

    /// <summary>Two ints in one word of a <see cref="Struct"/>, <paramref name="first"/> at the lower address.</summary>
    public static ulong Pair(int first, int second) => (uint)first | ((ulong)(uint)second << 32);

    /// <summary>Two floats in one word of a <see cref="Struct"/>, <paramref name="first"/> at the lower address.</summary>
    public static ulong Pair(float first, float second) =>
        Pair(BitConverter.SingleToInt32Bits(first), BitConverter.SingleToInt32Bits(second));

    /// <summary>A device pointer (T* in the kernel).</summary>
    public KernelArgs Ptr(IntPtr p) => Put((ulong)(long)p);

    /// <summary>A long long.</summary>
    public KernelArgs I64(long v) => Put((ulong)v);

    /// <summary>An int.</summary>
    public KernelArgs I32(int v) => Put((uint)v);

    /// <summary>A float.</summary>
    public KernelArgs F32(float v) => Put((uint)BitConverter.SingleToInt32Bits(v));

    /// <summary>A double.</summary>
    public KernelArgs F64(double v) => Put((ulong)BitConverter.DoubleToInt64Bits(v));
}

using LoRAHub.TorchExtensions.Cuda;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions.Quantization;

/// <summary>Which implementation dequantizes a 4-bit weight.</summary>
public enum DequantizeImpl
{
    /// <summary>The CUDA kernel for CUDA weights where LoRAHub's kernels can run, the composite ops otherwise.</summary>
    Auto = 0,
    /// <summary>Composite TorchSharp ops (index_select × absmax), on any device.</summary>
    Portable = 1,
    /// <summary>The CUDA kernel; an error where it does not apply.</summary>
    CudaKernel = 2,
}

/// <summary>
/// A weight stored in 4 bits (QLoRA): two codes per byte, one absmax per block of 64 values, and optionally the
/// absmax values themselves quantized to 8 bits in blocks of 256 after subtracting their mean (double quantization).
/// </summary>
public sealed class FourBitTensor : IDisposable
{
    internal FourBitTensor(Tensor packed, Tensor? absmax, Tensor? absmaxCodes, Tensor? absmaxScales, double absmaxOffset,
        long[] shape, string quantType, int blocksize, Tensor code, Tensor? nestedCode)
    {
        Packed = packed;
        Absmax = absmax;
        AbsmaxCodes = absmaxCodes;
        AbsmaxScales = absmaxScales;
        AbsmaxOffset = absmaxOffset;
        Shape = shape;
        QuantType = quantType;
        Blocksize = blocksize;
        Code = code;
        NestedCode = nestedCode;
        Validate();
    }

    /// <summary>uint8, two codes per byte (first value in the high nibble), padded to whole blocks.</summary>
    public Tensor Packed { get; private set; }
    /// <summary>fp32 absmax per block, when not double-quantized.</summary>
    public Tensor? Absmax { get; private set; }
    /// <summary>8-bit codes of (absmax − offset), when double-quantized (padded to a multiple of 256).</summary>
    public Tensor? AbsmaxCodes { get; private set; }
    /// <summary>fp32 scale per 256 absmax values, when double-quantized.</summary>
    public Tensor? AbsmaxScales { get; private set; }
    /// <summary>The mean of the fp32 absmax values (a float32 value), subtracted before their 8-bit quantization.</summary>
    public double AbsmaxOffset { get; private set; }
    public long[] Shape { get; }
    public string QuantType { get; }
    public int Blocksize { get; }
    /// <summary>The 16 code values (sorted) the packed indices point into.</summary>
    public Tensor Code { get; private set; }
    /// <summary>The 256-value 8-bit dynamic code of double quantization, or null.</summary>
    public Tensor? NestedCode { get; private set; }
    public bool DoubleQuantized => AbsmaxCodes is not null;
    public long Numel => Shape.Aggregate(1L, (a, b) => a * b);
    public Device device => Packed.device;
    private long Blocks => (Numel + Blocksize - 1) / Blocksize;

    /// <summary>Bytes held: packed codes plus the quantization constants.</summary>
    public long StorageBytes =>
        Packed.numel() + (Absmax?.numel() * 4 ?? 0) + (AbsmaxCodes?.numel() ?? 0) + (AbsmaxScales?.numel() * 4 ?? 0);

    /// <summary>Every tensor of the weight (for moving or registering as buffers).</summary>
    public IEnumerable<Tensor> Tensors =>
        new[] { Packed, Absmax, AbsmaxCodes, AbsmaxScales, Code, NestedCode }.Where(t => t is not null).Cast<Tensor>();

    /// <summary>The absmax constants in fp32, one per block (recovered from their 8-bit codes when double-quantized).</summary>
    public Tensor BlockAbsmax()
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        if (Absmax is { } a) return a.clone().MoveToOuterDisposeScope();
        var values = NestedCode!.index_select(0, AbsmaxCodes!.to(ScalarType.Int32)).view(AbsmaxScales!.numel(), FourBit.AbsmaxBlocksize) *
                     AbsmaxScales.unsqueeze(1);
        // The offset is a float32 value (the mean of fp32 absmax); added as such, CPU, CUDA ops and the kernel agree.
        return values.view(-1).narrow(0, 0, Blocks).add((double)(float)AbsmaxOffset).MoveToOuterDisposeScope();
    }

    /// <summary>The weight in the compute dtype: code value × block absmax (the CUDA kernel on GPU where available).</summary>
    public Tensor Dequantize(ScalarType dtype) => Dequantize(dtype, DequantizeImpl.Auto);

    public Tensor Dequantize(ScalarType dtype, DequantizeImpl impl)
    {
        if (!torch.is_floating_point(dtype)) throw new ArgumentException($"4-bit weights dequantize to a floating-point dtype, not {dtype}", nameof(dtype));
        var kernel = Packed.device_type == DeviceType.CUDA && KernelTensors.Supported(dtype) && CudaKernels.Available;
        if (impl == DequantizeImpl.CudaKernel && !kernel)
            throw new TorchException(TorchErrorKind.Argument,
                "the CUDA dequantization kernel needs a weight on a CUDA device, LoRAHub's CUDA kernels (" +
                (CudaKernels.UnavailableReason ?? "available") + ") and an fp32/fp16/bf16 output");
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        CheckDevices();
        Tensor? flat = null;
        if (impl != DequantizeImpl.Portable && kernel)
        {
            try
            {
                flat = QuantKernels.Dequantize(this, dtype);
            }
            catch (KernelCompileException) when (impl == DequantizeImpl.Auto)
            {
                // The kernels are off from now on; Auto takes the composite ops.
            }
        }
        flat ??= DequantizePortable(dtype);
        return flat.view(Shape).MoveToOuterDisposeScope();
    }

    private Tensor DequantizePortable(ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        var idx = Blockwise.Unpack(Packed);
        var values = Code.index_select(0, idx.to(ScalarType.Int32)).view(Blocks, Blocksize) * BlockAbsmax().unsqueeze(1);
        return values.view(-1).narrow(0, 0, Numel).to(dtype).MoveToOuterDisposeScope();
    }

    /// <summary>x·Wᵀ for this weight as (out×in), differentiable in x only; x must already be in the compute dtype.</summary>
    internal Tensor Linear(Tensor x, long outFeatures, long inFeatures)
    {
        if (x.dim() < 1 || x.size(-1) != inFeatures)
            throw new TorchException(TorchErrorKind.Argument,
                $"Linear4bit expects inputs of {inFeatures} features, got shape {KernelTensors.Shape(x)}");
        if (!x.is_floating_point()) throw new TorchException(TorchErrorKind.Argument, "Linear4bit inputs must be floating point");
        if (!KernelTensors.SameDevice(x, Packed))
            throw new TorchException(TorchErrorKind.Argument, $"the input is on {x.device} but the 4-bit weight on {Packed.device}");
        return new Linear4bitFunction(this, outFeatures, inFeatures).apply(x)[0];
    }

    /// <summary>
    /// A 4-bit weight from its parts, checked: <paramref name="packed"/> uint8 codes (first value in the high nibble, padded to
    /// whole blocks) indexing the sorted 16-value <paramref name="code"/>; either fp32 <paramref name="absmax"/> per block or,
    /// double-quantized, uint8 <paramref name="absmaxCodes"/> (padded to a multiple of 256) into the 256-value
    /// <paramref name="nestedCode"/> with one fp32 <paramref name="absmaxScales"/> per 256 and the float32 offset.
    /// </summary>
    public static FourBitTensor FromParts(Tensor packed, Tensor? absmax, Tensor? absmaxCodes, Tensor? absmaxScales, double absmaxOffset,
        long[] shape, string quantType, int blocksize, Tensor code, Tensor? nestedCode) =>
        new(packed, absmax, absmaxCodes, absmaxScales, absmaxOffset, shape, quantType, blocksize, code, nestedCode);

    /// <summary>Takes over another quantization of the same shape and settings in place (tensor identities are kept).</summary>
    internal void Assign(FourBitTensor other)
    {
        if (!other.Shape.SequenceEqual(Shape) || other.Blocksize != Blocksize || other.DoubleQuantized != DoubleQuantized || other.QuantType != QuantType)
            throw new ArgumentException("a 4-bit weight can only take over a quantization of the same shape and settings");
        using var _ = no_grad();
        // The codebooks too: a weight read from a file may carry other (equally valid) code values than ours.
        Code.set_(other.Code);
        NestedCode?.set_(other.NestedCode!);
        Packed.set_(other.Packed);
        Absmax?.set_(other.Absmax!);
        AbsmaxCodes?.set_(other.AbsmaxCodes!);
        AbsmaxScales?.set_(other.AbsmaxScales!);
        AbsmaxOffset = other.AbsmaxOffset;
    }

    /// <summary>Moves every tensor to <paramref name="target"/> (new tensors; the old ones are disposed).</summary>
    internal void MoveTo(Device target)
    {
        Tensor? Move(Tensor? t)
        {
            if (t is null) return null;
            var moved = t.to(target).DetachFromDisposeScope();
            if (!ReferenceEquals(moved, t)) t.Dispose();
            return moved;
        }
        Packed = Move(Packed)!;
        Absmax = Move(Absmax);
        AbsmaxCodes = Move(AbsmaxCodes);
        AbsmaxScales = Move(AbsmaxScales);
        Code = Move(Code)!;
        NestedCode = Move(NestedCode);
    }

    private void Validate()
    {
        if (Blocksize <= 0 || Blocksize % 2 != 0) throw new ArgumentException("4-bit blocksize must be a positive even number");
        if (Numel <= 0) throw new ArgumentException("a 4-bit weight must have at least one value");
        if (Packed.dtype != ScalarType.Byte || Packed.numel() != Blocks * Blocksize / 2)
            throw new ArgumentException($"packed 4-bit codes hold {Packed.numel()} bytes; {Numel} values in blocks of {Blocksize} need {Blocks * Blocksize / 2}");
        if (Code.dtype != ScalarType.Float32 || Code.numel() != 16) throw new ArgumentException("the 4-bit code must be 16 float32 values");
        if (Absmax is { } a)
        {
            if (a.dtype != ScalarType.Float32 || a.numel() != Blocks) throw new ArgumentException($"absmax must hold one float32 per block ({Blocks})");
        }
        else
        {
            if (AbsmaxCodes is null || AbsmaxScales is null || NestedCode is null)
                throw new ArgumentException("a double-quantized weight needs its absmax codes, scales and the 8-bit code");
            if (AbsmaxCodes.dtype != ScalarType.Byte || AbsmaxCodes.numel() < Blocks || AbsmaxCodes.numel() % FourBit.AbsmaxBlocksize != 0)
                throw new ArgumentException("double-quantized absmax codes must be uint8, one per block, padded to a multiple of 256");
            if (AbsmaxScales.dtype != ScalarType.Float32 || AbsmaxScales.numel() != AbsmaxCodes.numel() / FourBit.AbsmaxBlocksize)
                throw new ArgumentException("double quantization needs one float32 scale per 256 absmax codes");
            if (NestedCode.dtype != ScalarType.Float32 || NestedCode.numel() != 256) throw new ArgumentException("the 8-bit code must be 256 float32 values");
        }
    }

    // The kernel reads every tensor through raw pointers on the packed weight's device.
    private void CheckDevices()
    {
        foreach (var (t, what) in new[] { (Code, "the 4-bit code"), (Absmax, "absmax"), (AbsmaxCodes, "the absmax codes"),
                     (AbsmaxScales, "the absmax scales"), (NestedCode, "the 8-bit code") })
            if (t is not null && !KernelTensors.SameDevice(t, Packed))
                throw new TorchException(TorchErrorKind.Argument,
                    $"{what} is on {t.device} but the packed weight on {Packed.device}; move the whole layer with .to(device)");
    }

    public void Dispose()
    {
        foreach (var t in Tensors) t.Dispose();
    }
}

using LoRAHub.TorchExtensions.Quantization;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions.Modules;

/// <summary>
/// A Linear whose frozen weight is stored in 4 bits (bitsandbytes' bnb.nn.Linear4bit, QLoRA): NF4 or FP4 codes, one
/// absmax per block, optionally double-quantized. Forward dequantizes W in the compute dtype (bf16 by default) inside a
/// custom autograd function that frees it at once and dequantizes again in backward for the input gradient, so autograd
/// never keeps a dense copy of W. Inputs are cast to the compute dtype and outputs back to the input's dtype.
/// Buffers: weight (packed uint8), absmax (fp32, or uint8 codes when double-quantized), nested_absmax (fp32 scales),
/// quant_map (16 codes), nested_quant_map (256 codes); the bias, if any, is a frozen parameter.
/// Moving the module (.to(device)) moves all of them; converting it (.to(dtype)) converts only the bias: the
/// quantization constants stay fp32 and the compute dtype stays as chosen.
/// </summary>
public sealed class Linear4bit : nn.Module<Tensor, Tensor>, ILinearLayer
{
    private readonly FourBitTensor w;

    public Linear4bit(FourBitTensor weight, Tensor? bias = null, ScalarType compute_dtype = ScalarType.BFloat16) : base(nameof(Linear4bit))
    {
        if (weight.Shape.Length != 2) throw new ArgumentException($"Linear4bit needs a 2-D (out×in) weight, got [{string.Join(", ", weight.Shape)}]");
        if (!torch.is_floating_point(compute_dtype)) throw new ArgumentException($"the compute dtype must be floating point, got {compute_dtype}");
        if (bias is not null && (bias.dim() != 1 || bias.size(0) != weight.Shape[0]))
            throw new ArgumentException($"bias has shape [{string.Join(", ", bias.shape)}]; expected [{weight.Shape[0]}]");
        w = weight;
        this.compute_dtype = compute_dtype;
        RegisterBuffers();
        if (bias is not null) register_parameter("bias", new Parameter(bias, requires_grad: false));
        if (weight.device.type == DeviceType.CUDA)
        {
            _deviceType = DeviceType.CUDA;
            _deviceIndex = weight.device.index;
        }
    }

    private void RegisterBuffers()
    {
        ConditionallyRegisterBuffer("weight", w.Packed);
        ConditionallyRegisterBuffer("absmax", w.Absmax ?? w.AbsmaxCodes!);
        if (w.AbsmaxScales is not null) ConditionallyRegisterBuffer("nested_absmax", w.AbsmaxScales);
        ConditionallyRegisterBuffer("quant_map", w.Code);
        if (w.NestedCode is not null) ConditionallyRegisterBuffer("nested_quant_map", w.NestedCode);
    }

    /// <summary>
    /// Quantizes a dense Linear: its weight is copied to <paramref name="device"/> (default: where it is), quantized there,
    /// and the copy freed; the bias is moved too. The source layer is left as it was (dispose it to free its weight).
    /// </summary>
    public static Linear4bit FromLinear(ILinearLayer linear, Device? device = null, string quant_type = "nf4", int blocksize = 64,
        bool double_quant = true, ScalarType compute_dtype = ScalarType.BFloat16)
    {
        var target = device ?? linear.weight_device;
        FourBitTensor q;
        using (var scope = NewDisposeScope())
        using (no_grad())
        {
            var dense = linear.dense_weight();
            var onDevice = dense.device_type == target.type && dense.device_index == DeviceIndexOf(target) ? dense : dense.to(target);
            q = FourBit.Quantize(onDevice, quant_type, blocksize, double_quant);
        }
        Tensor? bias = null;
        if (linear.bias is { } b)
        {
            using var scope = NewDisposeScope();
            using var _ = no_grad();
            bias = b.detach().to(target).clone().MoveToOuterDisposeScope();
        }
        return new Linear4bit(q, bias, compute_dtype);
    }

    private static int DeviceIndexOf(Device d) => d.type == DeviceType.CUDA ? Math.Max(0, d.index) : -1;

    /// <summary>The quantized weight.</summary>
    public FourBitTensor quantized_weight => w;

    public ScalarType compute_dtype { get; }
    public string quant_type => w.QuantType;
    public int blocksize => w.Blocksize;
    public bool double_quant => w.DoubleQuantized;

    public long in_features => w.Shape[1];
    public long out_features => w.Shape[0];
    public Tensor? bias => get_parameter("bias");
    public Device weight_device => w.Packed.device;
    public ScalarType weight_dtype => compute_dtype;

    /// <summary>A new dense W (out×in) in the compute dtype.</summary>
    public Tensor dense_weight() => w.Dequantize(compute_dtype);

    /// <summary>W in another dtype (fp32 for merging without an intermediate rounding).</summary>
    public Tensor dense_weight(ScalarType dtype) => w.Dequantize(dtype);

    /// <summary>W += delta: dequantizes (fp32), adds, and quantizes again with the same settings (lossy, as any requantization).</summary>
    public void add_to_weight_(Tensor delta)
    {
        if (!delta.shape.SequenceEqual(w.Shape))
            throw new ArgumentException($"delta has shape [{string.Join(", ", delta.shape)}]; the weight is [{string.Join(", ", w.Shape)}]");
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        var sum = w.Dequantize(ScalarType.Float32) + delta.to(ScalarType.Float32, w.Packed.device);
        using var requantized = FourBit.Quantize(sum, w.QuantType, w.Blocksize, w.DoubleQuantized);
        w.Assign(requantized);
    }

    /// <summary>Bytes of the stored weight and its constants (4.5 bits per value, ≈ 4.127 with double quantization).</summary>
    public long weight_bytes => w.StorageBytes;

    public override Tensor forward(Tensor input)
    {
        using var scope = NewDisposeScope();
        var x = input.dtype == compute_dtype ? input : input.to(compute_dtype);
        var y = w.Linear(x, out_features, in_features);
        if (bias is { } b) y = y + (b.dtype == compute_dtype ? b : b.to(compute_dtype));
        if (y.dtype != input.dtype) y = y.to(input.dtype);
        return y.MoveToOuterDisposeScope();
    }

    // ---------------------------------------------------------------- moving

    protected override nn.Module _to(DeviceType deviceType, int deviceIndex, bool non_blocking)
    {
        MoveTo(new Device(deviceType, deviceIndex), null);
        return this;
    }

    protected override nn.Module _to(Device device, ScalarType dtype, bool non_blocking)
    {
        MoveTo(device, dtype);
        return this;
    }

    protected override nn.Module _to(ScalarType dtype, bool non_blocking)
    {
        MoveTo(null, dtype);
        return this;
    }

    private void MoveTo(Device? device, ScalarType? dtype)
    {
        if (dtype is { } t && !torch.is_floating_point(t)) throw new ArgumentException($"nn.Module.to only accepts floating point types, got {t}");
        using var _ = no_grad();
        if (device is not null)
        {
            if (device.type == DeviceType.CUDA && !torch.cuda.is_available()) throw new InvalidOperationException("CUDA is not available.");
            w.MoveTo(device);
            RegisterBuffers();
            _deviceType = device.type;
            _deviceIndex = device.type == DeviceType.CUDA ? Math.Max(0, device.index) : -1;
        }
        if (bias is { } b)
        {
            var moved = b.to(dtype ?? b.dtype, device ?? b.device).detach();
            var p = new Parameter(moved, requires_grad: b.requires_grad);
            ConditionallyRegisterParameter("bias", p);
            b.Dispose();
        }
    }

    public override string ToString() =>
        $"Linear4bit(in_features={in_features}, out_features={out_features}, bias={bias is not null}, quant_type={quant_type}, " +
        $"blocksize={blocksize}, double_quant={double_quant}, compute_dtype={compute_dtype})";
}

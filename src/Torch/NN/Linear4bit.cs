using LoRAHub.Torch.Quantization;

namespace LoRAHub.Torch.NN;

/// <summary>
/// A Linear whose frozen weight is stored in 4 bits (bitsandbytes' bnb.nn.Linear4bit, QLoRA): NF4 or FP4 codes, one
/// absmax per block, optionally double-quantized. Forward dequantizes W in the compute dtype (bf16 by default) inside a
/// custom autograd function that frees it at once and dequantizes again in backward for the input gradient, so autograd
/// never keeps a dense copy of W. Inputs are cast to the compute dtype and outputs back to the input's dtype.
/// Buffers: weight (packed uint8), absmax (fp32, or uint8 codes when double-quantized), nested_absmax (fp32 scales),
/// quant_map (16 codes), nested_quant_map (256 codes); the bias, if any, is a frozen parameter.
/// </summary>
public sealed class Linear4bit : Module, ILinearLayer
{
    private readonly FourBitTensor w;

    public Linear4bit(FourBitTensor weight, Tensor? bias = null, ScalarType compute_dtype = ScalarType.BFloat16) : base("Linear4bit")
    {
        if (weight.Shape.Length != 2) throw new ArgumentException($"Linear4bit needs a 2-D (out×in) weight, got [{string.Join(", ", weight.Shape)}]");
        if (!compute_dtype.IsFloatingPoint()) throw new ArgumentException($"the compute dtype must be floating point, got {compute_dtype}");
        if (bias != null && (bias.dim() != 1 || bias.size(0) != weight.Shape[0]))
            throw new ArgumentException($"bias has shape {bias.ShapeString}; expected [{weight.Shape[0]}]");
        w = weight;
        this.compute_dtype = compute_dtype;
        register_buffer("weight", weight.Packed);
        register_buffer("absmax", weight.Absmax ?? weight.AbsmaxCodes!);
        if (weight.AbsmaxScales != null) register_buffer("nested_absmax", weight.AbsmaxScales);
        register_buffer("quant_map", weight.Code);
        if (weight.NestedCode != null) register_buffer("nested_quant_map", weight.NestedCode);
        if (bias != null) register_parameter("bias", bias, requires_grad: false);
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
        using (var scope = torch.NewDisposeScope())
        using (torch.no_grad())
        {
            var dense = linear.dense_weight();
            var onDevice = dense.device == target ? dense : dense.to(target);
            q = FourBit.Quantize(onDevice, quant_type, blocksize, double_quant);
        }
        Tensor? bias = null;
        if (linear.bias is { } b)
        {
            using var scope = torch.NewDisposeScope();
            using var _ = torch.no_grad();
            bias = b.detach().to(target).clone().MoveToOuterDisposeScope();
        }
        return new Linear4bit(q, bias, compute_dtype);
    }

    /// <summary>The quantized weight.</summary>
    public FourBitTensor quantized_weight => w;

    public ScalarType compute_dtype { get; }
    public string quant_type => w.QuantType;
    public int blocksize => w.Blocksize;
    public bool double_quant => w.DoubleQuantized;

    public long in_features => w.Shape[1];
    public long out_features => w.Shape[0];
    public Tensor? bias => OptionalParameter("bias");
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
            throw new ArgumentException($"delta has shape {delta.ShapeString}; the weight is [{string.Join(", ", w.Shape)}]");
        using var scope = torch.NewDisposeScope();
        using var _ = torch.no_grad();
        var sum = w.Dequantize(ScalarType.Float32) + delta.to(w.Packed.device, ScalarType.Float32);
        using var requantized = FourBit.Quantize(sum, w.QuantType, w.Blocksize, w.DoubleQuantized);
        w.Assign(requantized);
    }

    /// <summary>Bytes of the stored weight and its constants (4.5 bits per value, ≈ 4.127 with double quantization).</summary>
    public long weight_bytes => w.StorageBytes;

    public override Tensor forward(Tensor input)
    {
        using var scope = torch.NewDisposeScope();
        var x = input.dtype == compute_dtype ? input : input.to(compute_dtype);
        var y = w.Linear(x, out_features, in_features);
        if (bias is { } b) y = y + (b.dtype == compute_dtype ? b : b.to(compute_dtype));
        if (y.dtype != input.dtype) y = y.to(input.dtype);
        return y.MoveToOuterDisposeScope();
    }

    public override string ToString() =>
        $"Linear4bit(in_features={in_features}, out_features={out_features}, bias={bias != null}, quant_type={quant_type}, " +
        $"blocksize={blocksize}, double_quant={double_quant}, compute_dtype={compute_dtype.ToTorchName()})";
}

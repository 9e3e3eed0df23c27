using LoRAHub.Tuners;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.HeadLoRA;

using F = TorchSharp.torch.nn.functional;

/// <summary>
/// A Linear with one low-rank adapter per attention head (<see cref="HeadLayout"/>). The components of all heads are
/// packed: q/k/v (output split) keep A (Σr_h × in) and B (head_dim × Σr_h), head h's rows of the output being
/// B_h·A_h·x; o (input split) keeps A (Σr_h × head_dim) and B (out × Σr_h), head h's A_h reading head h's columns of
/// the input; a plain layer is LoRA. So the parameters are exactly Σ r_h·(in + head_dim) (or head_dim + out), and the
/// update is block-structured by head. In adaptive mode E (Σr_h × 1) scales the components (AdaLoRA's singular values)
/// and masking zeroes it. Forward is one GEMM for the full side and one batched GEMM over heads for the split side,
/// heads of unequal rank padded to the largest.
/// </summary>
public sealed class HeadLoraLinear : DeltaTunerLayer
{
    private readonly nn.Module<Tensor, Tensor> lora_dropout;
    private readonly double[] componentScaling;
    private readonly Dictionary<(DeviceType, int, ScalarType), Tensor> constants = new();

    public HeadLoraLinear(nn.Module<Tensor, Tensor> baseLayer, HeadLayout layout, double alpha, double dropout, bool useRslora, int? adaptiveInitR)
        : base(nameof(HeadLoraLinear), baseLayer, "HeadLoRA")
    {
        Layout = layout;
        var linear = base_linear;
        var device = linear.weight_device;
        long r = layout.Rank, hd = layout.HeadDim;
        var (aCols, bRows) = layout.Split switch
        {
            HeadSplit.Output => (linear.in_features, hd),
            HeadSplit.Input => (hd, linear.out_features),
            _ => (linear.in_features, linear.out_features),
        };
        var a = torch.empty([r, aCols], dtype: ScalarType.Float32, device: device);
        var b = torch.empty([bRows, r], dtype: ScalarType.Float32, device: device);
        using (torch.no_grad())
        {
            if (adaptiveInitR is null)
            {
                // LoRA's init per head: A Kaiming-uniform over what it reads (bound 1/√fan_in), B = 0.
                a.uniform_(-1.0 / Math.Sqrt(aCols), 1.0 / Math.Sqrt(aCols));
                b.zero_();
            }
            else
            {
                // AdaLoRA's: A, B ~ N(0, 0.02) and E = 0.
                a.normal_(0, 0.02);
                b.normal_(0, 0.02);
            }
        }
        register_parameter("lora_A", new Parameter(a));
        register_parameter("lora_B", new Parameter(b));
        if (adaptiveInitR is not null) register_parameter("lora_E", new Parameter(torch.zeros([r, 1], dtype: ScalarType.Float32, device: device)));
        lora_dropout = nn.Dropout(dropout);
        register_module("lora_dropout", lora_dropout);
        // Head h's adapter is a LoRA of rank r_h: scale α/r_h (α/√r_h with rsLoRA). Adaptive mode keeps the training scale
        // α/init_r for every component, as AdaLoRA keeps ranknum = init_r.
        double Scale(int rank) => rank == 0 ? 0 : useRslora ? alpha / Math.Sqrt(rank) : alpha / rank;
        componentScaling = layout.Ranks.SelectMany(rh => Enumerable.Repeat(Scale(adaptiveInitR ?? rh), rh)).ToArray();
    }

    public HeadLayout Layout { get; }

    public Parameter A => get_parameter("lora_A")!;
    public Parameter B => get_parameter("lora_B")!;

    /// <summary>The components' singular values in adaptive mode, else null.</summary>
    public Parameter? E => get_parameter("lora_E");

    /// <summary>The scale of each packed component (its head's α/r_h, or α/init_r in adaptive mode).</summary>
    public IReadOnlyList<double> ComponentScaling => componentScaling;

    /// <summary>Which components the adaptive budget keeps (null: all); masked ones have E = 0.</summary>
    public bool[]? Keep { get; set; }

    /// <summary>Components kept per head (the head's effective rank).</summary>
    public int[] EffectiveRanks() =>
        Keep is null ? Layout.Ranks.ToArray() : Layout.Ranks.Select((r, h) => Keep.Skip(Layout.Offsets[h]).Take(r).Count(k => k)).ToArray();


    /// <summary>A constant tensor (index or scale) on a device in a dtype, made once.</summary>
    private Tensor Constant(int which, Device device, ScalarType dtype, Func<Tensor> make)
    {
        var key = (device.type, device.index * 8 + which, dtype);
        if (!constants.TryGetValue(key, out var t))
        {
            using (torch.no_grad()) t = make().to(dtype, device).DetachFromDisposeScope();
            constants[key] = t;
        }
        return t;
    }

    private Tensor Scaling(Device device, ScalarType dtype) => Constant(0, device, dtype, () => torch.tensor(componentScaling, ScalarType.Float64));
    private Tensor PadIndex(Device device) => Constant(1, device, ScalarType.Int64, () => torch.tensor(Layout.PadIndex()));
    private Tensor UnpadIndex(Device device) => Constant(2, device, ScalarType.Int64, () => torch.tensor(Layout.UnpadIndex()));
    private Tensor HeadIndex(Device device) => Constant(3, device, ScalarType.Int64, () => torch.tensor(Layout.HeadOfComponent()));

    /// <summary>A with E folded in (A ⊙ E in adaptive mode).</summary>
    private Tensor EffectiveA() => E is { } e ? A.mul(e) : A;

    /// <summary>
    /// The update as a plain LoRA pair, ΔW = B̂·Â with Â (Σr_h × in) and B̂ (out × Σr_h), scaling folded into B̂: for q/k/v
    /// Â is the packed A and B̂ puts head h's B_h in rows h·head_dim.. and columns of head h (zero elsewhere); for o Â puts
    /// A_h in the columns of head h's input slice and B̂ is the packed B. This is what merge adds and what PEFT's LoRA
    /// format stores (lora_A = Â, lora_B = B̂ with lora_alpha = r).
    /// </summary>
    public (Tensor a, Tensor b) ExpandedLora()
    {
        using var scope = torch.NewDisposeScope();
        var device = A.device;
        var a = EffectiveA();
        var b = B.mul(Scaling(device, B.dtype));
        var heads = Layout.Heads;
        if (Layout.Split == HeadSplit.Output)
        {
            // Row i of the output belongs to head i / head_dim; keep B's column j there only when j is that head's.
            var rowHead = torch.arange(b.size(0) * heads, device: device).div(Layout.HeadDim, rounding_mode: RoundingMode.floor);
            b = b.repeat(heads, 1).mul(rowHead.unsqueeze(1).eq(HeadIndex(device).unsqueeze(0)).to(b.dtype));
        }
        else if (Layout.Split == HeadSplit.Input)
        {
            var colHead = torch.arange(a.size(1) * heads, device: device).div(Layout.HeadDim, rounding_mode: RoundingMode.floor);
            a = a.repeat(1, heads).mul(HeadIndex(device).unsqueeze(1).eq(colHead.unsqueeze(0)).to(a.dtype));
        }
        return (a.MoveToOuterDisposeScope(), b.MoveToOuterDisposeScope());
    }

    /// <summary>ΔW (out × in), fp32.</summary>
    public override Tensor DeltaWeight()
    {
        using var scope = torch.NewDisposeScope();
        var (a, b) = ExpandedLora();
        return b.matmul(a).MoveToOuterDisposeScope();
    }

    protected override bool HasDelta => Layout.Rank != 0;

    protected override Tensor AdaptedForward(Tensor input)
    {
        if (Layout.Rank == 0) return base_layer.call(input);
        using var scope = torch.NewDisposeScope();
        var result = base_layer.call(input);
        var dtype = input.dtype;
        var device = input.device;
        var a = EffectiveA();
        Tensor b = B;
        // Mixed precision as LoRA: fp32 master weights, matmuls in the activations' dtype.
        if (a.dtype != dtype) a = a.to(dtype);
        if (b.dtype != dtype) b = b.to(dtype);
        var x = lora_dropout.call(input);
        long outFeatures = result.size(-1), n = result.numel() / outFeatures;
        long heads = Layout.Heads, r = Layout.MaxRank, hd = Layout.HeadDim;
        Tensor sum;
        switch (Layout.Split)
        {
            case HeadSplit.Output:
            {
                // xa = x·Aᵀ for all heads in one GEMM, then each head's (r_h → head_dim) map as one batched GEMM.
                var xa = F.linear(x, a).reshape(n, -1).mul(Scaling(device, dtype));
                Tensor xp, bp;
                if (Layout.Uniform)
                {
                    xp = xa.view(n, heads, r);
                    bp = b.view(hd, heads, r);
                }
                else
                {
                    var pad = PadIndex(device);
                    xp = F.pad(xa, [0, 1]).index_select(1, pad).view(n, heads, r);
                    bp = F.pad(b, [0, 1]).index_select(1, pad).view(hd, heads, r);
                }
                var y = torch.bmm(xp.transpose(0, 1), bp.permute(1, 2, 0)); // (heads, n, head_dim)
                sum = result.reshape(n, outFeatures).add(y.transpose(0, 1).reshape(n, outFeatures));
                break;
            }
            case HeadSplit.Input:
            {
                // Each head's slice through its A_h as one batched GEMM, then B over all components in one GEMM.
                var xh = x.reshape(n, heads, hd).transpose(0, 1); // (heads, n, head_dim)
                Tensor ap = Layout.Uniform ? a.view(heads, r, hd) : F.pad(a, [0, 0, 0, 1]).index_select(0, PadIndex(device)).view(heads, r, hd);
                var xa = torch.bmm(xh, ap.transpose(1, 2)).transpose(0, 1).reshape(n, heads * r);
                if (!Layout.Uniform) xa = xa.index_select(1, UnpadIndex(device));
                xa = xa.mul(Scaling(device, dtype));
                sum = result.reshape(n, outFeatures).addmm(xa, b.t(), beta: 1, alpha: 1);
                break;
            }
            default:
            {
                var xa = F.linear(x, a).reshape(n, -1).mul(Scaling(device, dtype));
                sum = result.reshape(n, outFeatures).addmm(xa, b.t(), beta: 1, alpha: 1);
                break;
            }
        }
        return sum.view(result.shape).MoveToOuterDisposeScope();
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            foreach (var t in constants.Values) t.Dispose();
            constants.Clear();
        }
        base.Dispose(disposing);
    }
}

using LoRAHub.TorchExtensions;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace LoRAHub.Models.Gpt2;

/// <summary>
/// transformers' Conv1D: a linear layer whose weight is stored (in, out), i.e. transposed from Linear, computing
/// x·W + b. Kept in that layout so GPT-2 checkpoints load as they are (PEFT calls this fan_in_fan_out).
/// </summary>
public sealed class Conv1D : nn.Module<Tensor, Tensor>, ILinearLayer
{
    [ComponentName(Name = "weight")] private Parameter _weight;
    [ComponentName(Name = "bias")] private Parameter _bias;

    public Conv1D(long inFeatures, long outFeatures, ScalarType dtype, Device device) : base(nameof(Conv1D))
    {
        _weight = new Parameter(empty([inFeatures, outFeatures], dtype, device).normal_(0, 0.02));
        _bias = new Parameter(zeros([outFeatures], dtype, device));
        RegisterComponents();
    }

    // Setters as TorchSharp's own layers have them: Module.to() replaces parameters through public properties.
    public Parameter weight
    {
        get => _weight;
        set
        {
            if (ReferenceEquals(value, _weight)) return;
            _weight.Dispose();
            _weight = (Parameter)value.DetachFromDisposeScope();
            ConditionallyRegisterParameter("weight", _weight);
        }
    }

    public Parameter bias
    {
        get => _bias;
        set
        {
            if (ReferenceEquals(value, _bias)) return;
            _bias.Dispose();
            _bias = (Parameter)value.DetachFromDisposeScope();
            ConditionallyRegisterParameter("bias", _bias);
        }
    }

    public long in_features => _weight.size(0);
    public long out_features => _weight.size(1);

    public override Tensor forward(Tensor input)
    {
        using var wt = _weight.t();
        return nn.functional.linear(input, wt, _bias);
    }

    Tensor? ILinearLayer.bias => _bias;
    public Device weight_device => _weight.device;
    public ScalarType weight_dtype => _weight.dtype;

    /// <summary>W as (out, in): a transposed view of the stored (in, out) weight.</summary>
    public Tensor dense_weight() => _weight.t();

    public void add_to_weight_(Tensor delta)
    {
        using var _ = no_grad();
        using var dt = delta.t();
        if (dt.dtype == _weight.dtype && torchx.same_device(dt, _weight)) _weight.add_(dt);
        else
        {
            using var cast = dt.to(_weight.dtype, _weight.device);
            _weight.add_(cast);
        }
    }
}

using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

/// <summary>Views modules as <see cref="ILinearLayer"/>: ours implement it; TorchSharp's <see cref="Linear"/> gets an adapter.</summary>
public static class LinearLayer
{
    /// <summary>The module as an <see cref="ILinearLayer"/>, or null if it is not Linear-like.</summary>
    public static ILinearLayer? From(nn.Module? module) => module switch
    {
        ILinearLayer layer => layer,
        Linear linear => new TorchSharpLinear(linear),
        _ => null,
    };

    /// <summary>True when <see cref="From"/> would return a layer.</summary>
    public static bool IsLinear(nn.Module? module) => module is ILinearLayer or Linear;

    // A view, not a copy: reads the Linear's live parameters on every call, so moves and casts of the module show through.
    private sealed class TorchSharpLinear(Linear linear) : ILinearLayer
    {
        public long in_features => linear.in_features;
        public long out_features => linear.out_features;
        public Tensor? bias => linear.bias;
        public Device weight_device => linear.weight!.device;
        public ScalarType weight_dtype => linear.weight!.dtype;
        public Tensor dense_weight() => linear.weight!;

        public void add_to_weight_(Tensor delta)
        {
            using var _ = no_grad();
            var w = linear.weight!;
            if (delta.dtype == w.dtype && torchx.same_device(delta, w)) w.add_(delta);
            else
            {
                using var cast = delta.to(w.dtype, w.device);
                w.add_(cast);
            }
        }

        public override bool Equals(object? obj) => obj is TorchSharpLinear other && ReferenceEquals(other.Module, Module);
        public override int GetHashCode() => Module.GetHashCode();
        private Linear Module => linear;
    }
}

using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

public static partial class torchx
{
    public static partial class nn
    {
        /// <summary>An <see cref="Modules.RMSNorm"/> over the last dimension of size <paramref name="dim"/> (weight initialised to ones).</summary>
        public static Modules.RMSNorm RMSNorm(long dim, double eps = 1e-6, ScalarType? dtype = null, Device? device = null) =>
            new(dim, eps, dtype, device);
    }
}

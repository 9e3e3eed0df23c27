using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.TorchExtensions;

public static partial class torchx
{
    /// <summary>
    /// Seeds every generator, as PyTorch's torch.manual_seed does: the CPU generator and the default generator of every
    /// CUDA device. TorchSharp's torch.manual_seed seeds only the CPU generator (LibTorchSharp's THSGenerator_manual_seed),
    /// so after it, random values drawn on a GPU (randn(..., device: cuda), the init of nn.Linear(..., device: cuda),
    /// dropout) continue the CUDA generator's stream and a rerun with the same seed does not repeat them.
    /// </summary>
    public static void manual_seed(long seed)
    {
        using (torch.manual_seed(seed)) { }
        if (torch.cuda.is_available()) torch.cuda.manual_seed_all(seed);
    }
}

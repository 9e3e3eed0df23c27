using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Host;

/// <summary>The <c>--device</c> value: cpu, cuda (or gpu) or cuda:N, checked against what the loaded libtorch offers.</summary>
public static class HostDevice
{
    /// <exception cref="ArgumentException">Not a device name, or a CUDA device that this process cannot use.</exception>
    public static Device Parse(string text)
    {
        var s = text.Trim().ToLowerInvariant();
        if (s == "cpu") return CPU;
        int index;
        if (s is "cuda" or "gpu") index = 0;
        else if (!s.StartsWith("cuda:", StringComparison.Ordinal) || !int.TryParse(s.AsSpan(5), out index) || index < 0)
            throw new ArgumentException($"unknown device '{text}'; use cpu, cuda or cuda:N");
        // TorchSharp would fail later, deep in the script, with its load trace; say it here instead.
        if (!cuda.is_available())
            throw new ArgumentException($"device '{text}': CUDA is not available in this process (run `dotnet loraHub info`; set LORAHUB_LIBTORCH to a CUDA build of PyTorch's torch/lib)");
        if (index >= cuda.device_count())
            throw new ArgumentException($"device '{text}': there are {cuda.device_count()} CUDA devices");
        return device(DeviceType.CUDA, index);
    }

    /// <summary>cuda:0 when CUDA is available, else cpu.</summary>
    public static Device Default() => cuda.is_available() ? device(DeviceType.CUDA, 0) : CPU;
}

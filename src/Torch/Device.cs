namespace LoRAHub.Torch;

public enum DeviceType { CPU = 0, CUDA = 1 }

/// <summary>A compute device: "cpu" or "cuda:N".</summary>
public readonly record struct Device(DeviceType Type, int Index = 0)
{
    public static readonly Device CPU = new(DeviceType.CPU);
    public static readonly Device CUDA = new(DeviceType.CUDA);

    public bool IsCuda => Type == DeviceType.CUDA;

    /// <summary>Parses "cpu", "cuda" and "cuda:N".</summary>
    public static Device Parse(string text)
    {
        var s = text.Trim().ToLowerInvariant();
        if (s == "cpu") return CPU;
        if (s == "cuda" || s == "gpu") return CUDA;
        if (s.StartsWith("cuda:", StringComparison.Ordinal) && int.TryParse(s.AsSpan(5), out var index) && index >= 0)
            return new Device(DeviceType.CUDA, index);
        throw new ArgumentException($"unknown device '{text}'; use cpu, cuda or cuda:N");
    }

    public static implicit operator Device(string text) => Parse(text);

    public override string ToString() => Type == DeviceType.CPU ? "cpu" : $"cuda:{Index}";
}

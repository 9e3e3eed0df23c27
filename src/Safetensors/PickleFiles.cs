namespace LoRAHub.Safetensors;

/// <summary>
/// Recognises PyTorch's pickle checkpoints (pytorch_model.bin, adapter_model.bin, *.pt) so that they are refused by
/// name. Unpickling runs whatever code the file asks for, so LoRAHub never reads them; the error says how to convert.
/// </summary>
public static class PickleFiles
{
    private static readonly string[] Extensions = [".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"];

    /// <summary>What to do instead, for every refusal message.</summary>
    public const string Fix =
        "LoRAHub reads only safetensors, never pickle (loading a pickle can run code hidden in it); convert it once in Python " +
        "from a source you trust: safetensors.torch.save_file(torch.load(path, weights_only=True), \"model.safetensors\") " +
        "(for an adapter: adapter_model.safetensors), or save the model with save_pretrained(..., safe_serialization=True)";

    /// <summary>
    /// torch.save's zip archive ("PK\x03\x04") or a bare pickle (0x80, protocol 2 to 5). A valid safetensors file can
    /// start with the same bytes (its header length), so callers first rule safetensors out.
    /// </summary>
    public static bool LooksLikePickle(ReadOnlySpan<byte> start) =>
        (start.Length >= 4 && start[0] == (byte)'P' && start[1] == (byte)'K' && start[2] == 3 && start[3] == 4)
        || (start.Length >= 2 && start[0] == 0x80 && start[1] is >= 2 and <= 5);

    /// <summary>The pickle checkpoints in a folder (by extension and PyTorch's index names), sorted.</summary>
    public static IReadOnlyList<string> InFolder(string folder) =>
        Directory.EnumerateFiles(folder)
            .Select(Path.GetFileName)
            .Where(n => Extensions.Any(e => n!.EndsWith(e, StringComparison.OrdinalIgnoreCase)) || n!.EndsWith(".bin.index.json", StringComparison.Ordinal))
            .Order(StringComparer.Ordinal)
            .ToList()!;

    internal static SafetensorsFormatException Refuse(string path, string what) =>
        new(path, null, $"{what}; {Fix}");
}

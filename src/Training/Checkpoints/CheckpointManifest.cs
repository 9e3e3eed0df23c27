using System.Security.Cryptography;
using System.Text.Json;
using System.Text.Json.Serialization;
using LoRAHub.Safetensors;

namespace LoRAHub.Training.Checkpoints;

/// <summary>
/// checkpoint.json: the size and SHA-256 of every file of a checkpoint, written last. A checkpoint folder is complete
/// when its manifest exists and every file matches it; resume skips any other (torn by a crash, damaged on disk).
/// </summary>
public sealed class CheckpointManifest
{
    public const string FileName = "checkpoint.json";
    public const int CurrentFormat = 1;

    [JsonPropertyName("format")] public int Format { get; set; } = CurrentFormat;
    [JsonPropertyName("step")] public long Step { get; set; }
    /// <summary>Path relative to the checkpoint folder ('/'-separated) → size and hash.</summary>
    [JsonPropertyName("files")] public SortedDictionary<string, FileEntry> Files { get; set; } = new(StringComparer.Ordinal);

    public sealed class FileEntry
    {
        [JsonPropertyName("size")] public long Size { get; set; }
        [JsonPropertyName("sha256")] public string Sha256 { get; set; } = "";
    }

    private static readonly JsonSerializerOptions Json = new() { WriteIndented = true };

    /// <summary>Hashes every file under the folder and writes the manifest beside them (atomically).</summary>
    public static void Write(string folder, long step)
    {
        var manifest = new CheckpointManifest { Step = step };
        foreach (var file in Directory.EnumerateFiles(folder, "*", SearchOption.AllDirectories))
        {
            var relative = Path.GetRelativePath(folder, file).Replace('\\', '/');
            if (relative == FileName) continue;
            manifest.Files[relative] = new FileEntry { Size = new FileInfo(file).Length, Sha256 = Hash(file) };
        }
        var bytes = JsonSerializer.SerializeToUtf8Bytes(manifest, Json);
        AtomicFile.Write(Path.Combine(folder, FileName), stream => stream.Write(bytes));
    }

    /// <summary>Null when the folder matches its manifest; otherwise what is wrong, for messages.</summary>
    public static string? Verify(string folder)
    {
        var path = Path.Combine(folder, FileName);
        if (!File.Exists(path)) return $"{FileName} is missing (the checkpoint was not finished)";
        CheckpointManifest? manifest;
        try
        {
            manifest = JsonSerializer.Deserialize<CheckpointManifest>(File.ReadAllBytes(path));
        }
        catch (Exception e) when (e is JsonException or IOException)
        {
            return $"{FileName} is unreadable ({e.Message})";
        }
        if (manifest is null || manifest.Files.Count == 0) return $"{FileName} lists no files";
        if (manifest.Format > CurrentFormat) return $"{FileName} has format {manifest.Format}, newer than this LoRAHub reads ({CurrentFormat})";
        foreach (var (relative, entry) in manifest.Files)
        {
            // Only names inside the folder: a manifest must not make us read elsewhere.
            var full = Path.GetFullPath(Path.Combine(folder, relative));
            if (!full.StartsWith(Path.GetFullPath(folder) + Path.DirectorySeparatorChar, StringComparison.Ordinal))
                return $"{FileName} names a file outside the checkpoint ('{relative}')";
            if (!File.Exists(full)) return $"{relative} is missing";
            var size = new FileInfo(full).Length;
            if (size != entry.Size) return $"{relative} has {size} bytes, the manifest says {entry.Size}";
            if (!string.Equals(Hash(full), entry.Sha256, StringComparison.OrdinalIgnoreCase)) return $"{relative} does not match its SHA-256 in the manifest";
        }
        return null;
    }

    private static string Hash(string file)
    {
        using var stream = new FileStream(file, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1 << 20);
        return Convert.ToHexStringLower(SHA256.HashData(stream));
    }
}

using System.Security.Cryptography;
using System.Text;

namespace LoRAHub.TorchExtensions.Cuda;

/// <summary>
/// Compiled kernel images on disk, so a process does not wait for NVRTC again for a source it compiled before. Keyed by
/// the source, its headers, the options, the target architecture and the NVRTC version. Folder: LORAHUB_KERNEL_CACHE,
/// else $XDG_CACHE_HOME/lorahub/kernels or ~/.cache/lorahub/kernels; LORAHUB_KERNEL_CACHE=0 turns it off. A damaged or
/// unreadable entry is simply compiled again; failing to write one is not an error.
/// </summary>
internal static class KernelCache
{
    private static readonly string? folder = Folder();

    private static string? Folder()
    {
        var env = Environment.GetEnvironmentVariable("LORAHUB_KERNEL_CACHE");
        if (env is "0" or "off") return null;
        if (!string.IsNullOrWhiteSpace(env)) return env;
        var cache = Environment.GetEnvironmentVariable("XDG_CACHE_HOME");
        if (string.IsNullOrWhiteSpace(cache))
        {
            var home = Environment.GetFolderPath(Environment.SpecialFolder.UserProfile);
            if (string.IsNullOrWhiteSpace(home)) return null;
            cache = Path.Combine(home, ".cache");
        }
        return Path.Combine(cache, "lorahub", "kernels");
    }

    public static string Key(string name, string source, IReadOnlyDictionary<string, string> headers, int arch, IEnumerable<string> options)
    {
        var text = new StringBuilder().Append(Nvrtc.Version).Append('\0').Append(arch).Append('\0').Append(string.Join("\0", options)).Append('\0')
            .Append(source);
        foreach (var (header, content) in headers.OrderBy(h => h.Key, StringComparer.Ordinal)) text.Append('\0').Append(header).Append('\0').Append(content);
        var hash = Convert.ToHexString(SHA256.HashData(Encoding.UTF8.GetBytes(text.ToString()))).ToLowerInvariant();
        return $"{Path.GetFileNameWithoutExtension(name)}-sm{arch}-{hash[..24]}.bin";
    }

    public static byte[]? Load(string key)
    {
        if (folder is null) return null;
        try
        {
            var path = Path.Combine(folder, key);
            return File.Exists(path) ? File.ReadAllBytes(path) : null;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return null;
        }
    }

    public static void Store(string key, byte[] image)
    {
        if (folder is null) return;
        try
        {
            Directory.CreateDirectory(folder);
            var temp = Path.Combine(folder, $".{key}.{Environment.ProcessId}.tmp");
            File.WriteAllBytes(temp, image);
            File.Move(temp, Path.Combine(folder, key), overwrite: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // A read-only or full disk only costs the next process a compile.
        }
    }
}

using System.Security.Cryptography;

namespace LoRAHub.Safetensors;

/// <summary>
/// Replaces a file all at once: the content goes to a temporary file in the same folder, is flushed to disk, and is
/// then renamed over the target. Readers see the old file or the new one, never a partial one, and a failure leaves
/// the old file untouched.
/// </summary>
public static class AtomicFile
{
    public static void Write(string path, Action<Stream> write)
    {
        var target = Path.GetFullPath(path);
        Directory.CreateDirectory(Path.GetDirectoryName(target)!);
        // Same folder, so the rename never crosses file systems (which would turn it into a copy); a random suffix, so
        // concurrent writers of the same path do not collide.
        var temp = $"{target}.tmp-{Convert.ToHexStringLower(RandomNumberGenerator.GetBytes(8))}";
        try
        {
            using (var stream = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None, bufferSize: 1 << 20))
            {
                // Crash tests count this file's bytes here (WriteFaults); otherwise the stream itself is written.
                var tracked = WriteFaults.Track(stream, Path.GetFileName(target), out var beforeCommit);
                write(tracked);
                // Without this the rename could reach the disk before the data, leaving an empty file after a crash.
                stream.Flush(flushToDisk: true);
                beforeCommit();
            }
            File.Move(temp, target, overwrite: true);
            // The rename itself is durable only once the folder is synced.
            Durable.SyncDirectory(Path.GetDirectoryName(target)!);
        }
        catch
        {
            TryDelete(temp);
            throw;
        }
    }

    private static void TryDelete(string temp)
    {
        // Best effort: the original exception matters more than a failure to clean up.
        try
        {
            File.Delete(temp);
        }
        catch (IOException)
        {
        }
        catch (UnauthorizedAccessException)
        {
        }
    }
}

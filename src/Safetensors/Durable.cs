using System.Runtime.InteropServices;

namespace LoRAHub.Safetensors;

/// <summary>
/// fsync for files and folders. A rename is durable only once the folder that holds it is synced; .NET has no API for
/// a folder handle, so on Unix this opens it through libc. On Windows, NTFS journals renames and folders cannot be
/// opened this way: syncing a folder is a no-op there.
/// </summary>
public static class Durable
{
    /// <summary>Flushes a written file's data to the disk.</summary>
    public static void SyncFile(string path)
    {
        using var stream = new FileStream(path, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite | FileShare.Delete, bufferSize: 1);
        stream.Flush(flushToDisk: true);
    }

    /// <summary>Flushes a folder's entries (the names created, renamed or deleted in it) to the disk.</summary>
    public static void SyncDirectory(string path)
    {
        if (OperatingSystem.IsWindows()) return;
        const int ReadOnlyDirectory = 0x10000; // O_RDONLY | O_DIRECTORY on Linux; macOS ignores an unknown high bit here
        var fd = open(path, OperatingSystem.IsLinux() ? ReadOnlyDirectory : 0);
        // A folder we may write but not read (rare) cannot be opened: its renames stand, only their durability is the OS's.
        if (fd < 0) return;
        try
        {
            if (fsync(fd) != 0)
            {
                var errno = Marshal.GetLastPInvokeError();
                // EINVAL: the file system cannot sync folders (some network and FUSE mounts); nothing more can be done there.
                if (errno != 22) throw new IOException($"cannot sync folder {path} (errno {errno})");
            }
        }
        finally
        {
            close(fd);
        }
    }

    /// <summary>Syncs every file under a folder, then each folder from the deepest up.</summary>
    public static void SyncTree(string root)
    {
        foreach (var file in Directory.EnumerateFiles(root, "*", SearchOption.AllDirectories)) SyncFile(file);
        foreach (var dir in Directory.EnumerateDirectories(root, "*", SearchOption.AllDirectories).OrderByDescending(d => d.Length))
            SyncDirectory(dir);
        SyncDirectory(root);
    }

    [DllImport("libc", SetLastError = true)]
    private static extern int open([MarshalAs(UnmanagedType.LPUTF8Str)] string path, int flags);

    [DllImport("libc", SetLastError = true)]
    private static extern int fsync(int fd);

    [DllImport("libc")]
    private static extern int close(int fd);
}

using System.Runtime.InteropServices;

namespace LoRAHub.Host.Plugins;

/// <summary>
/// Plugins are code the host runs with the user's rights, so a plugin folder that another user can write to is refused
/// (as ssh refuses a group-writable ~/.ssh): the folder, its files and the folders above it must be writable only by
/// their owner (the user or root). A folder above it may be world-writable if it has the sticky bit (/tmp): others can
/// add entries there but not replace ours. A group-writable entry is accepted only when the user owns it and the group
/// is the user's own primary group (user-private groups, umask 002).
/// </summary>
public static class PluginTrust
{
    /// <summary>Why the folder must not be loaded, or null when it is safe (always null off Unix).</summary>
    public static string? Check(string folder)
    {
        if (OperatingSystem.IsWindows()) return null;
        var user = Native.getuid();
        var group = Native.getgid();
        var full = Path.TrimEndingDirectorySeparator(Path.GetFullPath(folder));
        var entries = Directory.Exists(full) ? Directory.GetFiles(full).Prepend(full) : [full];
        foreach (var path in entries)
            if (Unsafe(path, user, group, isAncestor: false) is { } reason) return reason;
        for (var parent = Path.GetDirectoryName(full); parent is not null; parent = Path.GetDirectoryName(parent))
            if (Unsafe(parent, user, group, isAncestor: true) is { } reason) return reason;
        return null;
    }

    private static string? Unsafe(string path, uint user, uint group, bool isAncestor)
    {
        if (!Native.TryStat(path, out var mode, out var owner, out var ownerGroup)) return null; // vanished: the loader reports it
        const uint otherWrite = 0x2, groupWrite = 0x10, sticky = 0x200;
        var what = isAncestor ? $"{path} (a folder above the plugin)" : path;
        var fix = $"chmod go-w '{path}'";
        var octal = Convert.ToString(mode & 0xFFF, 8).PadLeft(4, '0');
        if (owner != user && owner != 0)
            return $"refused: {what} belongs to another user (uid {owner}); plugins run as you, so they must be yours or root's";
        if ((mode & otherWrite) != 0 && !(isAncestor && (mode & sticky) != 0))
            return $"refused: {what} is writable by every user (mode {octal}); fix it with {fix}";
        if ((mode & groupWrite) != 0 && !(owner == user && ownerGroup == group))
            return $"refused: {what} is writable by group {ownerGroup} (mode {octal}); fix it with {fix}";
        return null;
    }

    private static class Native
    {
        [DllImport("libc", SetLastError = true)]
        public static extern uint getuid();

        [DllImport("libc", SetLastError = true)]
        public static extern uint getgid();

        [DllImport("libc", SetLastError = true, EntryPoint = "stat")]
        private static extern int stat(string path, byte[] buffer);

        /// <summary>st_mode, st_uid and st_gid read from struct stat at the offsets of the 64-bit Linux ABIs.</summary>
        public static bool TryStat(string path, out uint mode, out uint owner, out uint group)
        {
            var buffer = new byte[256];
            mode = owner = group = 0;
            if (stat(path, buffer) != 0) return false;
            // x86-64: dev(8) ino(8) nlink(8) mode(4) uid(4) gid(4); arm64 (generic): dev(8) ino(8) mode(4) nlink(4) uid(4) gid(4).
            var (modeAt, uidAt) = RuntimeInformation.ProcessArchitecture == Architecture.X64 ? (24, 28) : (16, 24);
            if (!OperatingSystem.IsLinux()) (modeAt, uidAt) = (-1, -1);
            if (modeAt < 0 && !OperatingSystem.IsWindows())
            {
                // Elsewhere (macOS) only the mode is portable: UnixFileMode through .NET; ownership is not checked.
                mode = (uint)File.GetUnixFileMode(path);
                owner = getuid();
                group = getgid();
                return true;
            }
            mode = BitConverter.ToUInt32(buffer, modeAt);
            owner = BitConverter.ToUInt32(buffer, uidAt);
            group = BitConverter.ToUInt32(buffer, uidAt + 4);
            return true;
        }
    }
}

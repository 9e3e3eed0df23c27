using System.Text;

namespace LoRAHub.Safetensors.Tests;

/// <summary>Builds safetensors bytes by hand, so tests can describe files our writer would never produce.</summary>
public static class RawFile
{
    /// <summary>The length prefix (the real header length unless <paramref name="claimedLength"/> overrides it), the header, then the data.</summary>
    public static byte[] Build(string header, byte[]? data = null, ulong? claimedLength = null) =>
        Build(Encoding.UTF8.GetBytes(header), data, claimedLength);

    public static byte[] Build(byte[] header, byte[]? data = null, ulong? claimedLength = null)
    {
        var bytes = new List<byte>();
        bytes.AddRange(BitConverter.GetBytes(claimedLength ?? (ulong)header.Length)); // x86/ARM: little-endian
        bytes.AddRange(header);
        bytes.AddRange(data ?? []);
        return bytes.ToArray();
    }
}

using System.Text;

namespace LoRAHub.Models.Tokenization;

/// <summary>
/// GPT-2's reversible byte↔character map: printable Latin-1 bytes stand for themselves, the other 68 bytes are
/// shifted to U+0100.., so every byte string is a string of visible characters that BPE can merge.
/// </summary>
public static class ByteLevel
{
    private static readonly char[] ByteToChar = BuildMap();
    private static readonly Dictionary<char, byte> CharToByte = Enumerable.Range(0, 256).ToDictionary(b => ByteToChar[b], b => (byte)b);

    private static char[] BuildMap()
    {
        var map = new char[256];
        var next = 256;
        for (var b = 0; b < 256; b++)
        {
            var printable = b is >= '!' and <= '~' or >= 0xA1 and <= 0xAC or >= 0xAE and <= 0xFF;
            map[b] = printable ? (char)b : (char)next++;
        }
        return map;
    }

    /// <summary>The UTF-8 bytes of text, each written as its map character.</summary>
    public static string Encode(string text)
    {
        var bytes = Encoding.UTF8.GetBytes(text);
        var chars = new char[bytes.Length];
        for (var i = 0; i < bytes.Length; i++) chars[i] = ByteToChar[bytes[i]];
        return new string(chars);
    }

    /// <summary>Bytes of one token; as in tokenizers, a token with a character outside the map keeps its own UTF-8.</summary>
    public static byte[] DecodeToken(string token)
    {
        var result = new byte[token.Length];
        for (var i = 0; i < token.Length; i++)
        {
            if (!CharToByte.TryGetValue(token[i], out var b)) return Encoding.UTF8.GetBytes(token);
            result[i] = b;
        }
        return result;
    }
}

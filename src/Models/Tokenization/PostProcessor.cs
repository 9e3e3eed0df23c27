using System.Text.Json;

namespace LoRAHub.Models.Tokenization;

/// <summary>tokenizer.json's "post_processor" for single sequences: TemplateProcessing (bos/eos), ByteLevel (no-op).</summary>
public sealed class PostProcessor
{
    // Each entry is either a fixed list of special ids or null for "the sequence itself".
    private readonly List<int[]?> template;

    private PostProcessor(List<int[]?> template) => this.template = template;

    public static readonly PostProcessor None = new([null]);

    /// <summary>True when no tokens are added.</summary>
    public bool IsEmpty => template.All(t => t is null);

    /// <summary>The first special id the template puts before the sequence (bos), if any.</summary>
    public int? BosTokenId => template.Count > 1 && template[0] is { Length: > 0 } first ? first[0] : null;

    public static PostProcessor FromJson(JsonElement? json)
    {
        if (json is not { ValueKind: JsonValueKind.Object } p) return None;
        var type = p.GetProperty("type").GetString();
        switch (type)
        {
            case "ByteLevel":
                return None;
            case "Sequence":
                // Sequence[ByteLevel, TemplateProcessing] (Llama 3): the template is what adds tokens.
                return p.GetProperty("processors").EnumerateArray().Select(e => FromJson(e)).LastOrDefault(x => !x.IsEmpty) ?? None;
            case "TemplateProcessing":
                var specials = new Dictionary<string, int[]>();
                foreach (var s in p.GetProperty("special_tokens").EnumerateObject())
                    specials[s.Name] = s.Value.GetProperty("ids").EnumerateArray().Select(x => x.GetInt32()).ToArray();
                var template = new List<int[]?>();
                foreach (var item in p.GetProperty("single").EnumerateArray())
                {
                    if (item.TryGetProperty("Sequence", out _)) template.Add(null);
                    else
                    {
                        var name = item.GetProperty("SpecialToken").GetProperty("id").GetString()!;
                        template.Add(specials.TryGetValue(name, out var ids) ? ids : throw new InvalidDataException($"tokenizer.json: template token '{name}' is not in special_tokens"));
                    }
                }
                return new PostProcessor(template);
            default:
                throw new NotSupportedException($"post_processor '{type}' is not supported (TemplateProcessing, ByteLevel, Sequence)");
        }
    }

    public List<int> Apply(List<int> ids)
    {
        var result = new List<int>(ids.Count + 2);
        foreach (var t in template) result.AddRange(t ?? (IEnumerable<int>)ids);
        return result;
    }
}

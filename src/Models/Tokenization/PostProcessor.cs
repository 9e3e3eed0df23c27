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
        if (JsonFields.OptionalObject(json, "post_processor") is not { } p) return None;
        var type = p.RequiredString("type");
        switch (type)
        {
            case "ByteLevel":
                return None;
            case "Sequence":
                // Sequence[ByteLevel, TemplateProcessing] (Llama 3): the template is what adds tokens.
                return p.RequiredArray("processors").Select(e => FromJson(e)).LastOrDefault(x => !x.IsEmpty) ?? None;
            case "TemplateProcessing":
                var specials = new Dictionary<string, int[]>();
                var specialTokens = p.Required("special_tokens");
                if (specialTokens.ValueKind != JsonValueKind.Object) throw new InvalidDataException($"'special_tokens' is {JsonFields.Kind(specialTokens)}; expected an object");
                foreach (var s in specialTokens.EnumerateObject())
                    specials[s.Name] = s.Value.RequiredArray("ids").Select(x => x.AsInt($"special_tokens.{s.Name}.ids")).ToArray();
                var template = new List<int[]?>();
                foreach (var item in p.RequiredArray("single"))
                {
                    if (item.ValueKind == JsonValueKind.Object && item.TryGetProperty("Sequence", out _)) template.Add(null);
                    else
                    {
                        var name = item.Required("SpecialToken").RequiredString("id");
                        template.Add(specials.TryGetValue(name, out var ids) ? ids : throw new InvalidDataException($"template token '{name}' is not in special_tokens"));
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

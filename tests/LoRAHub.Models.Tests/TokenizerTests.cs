using System.Text.Json.Nodes;
using LoRAHub.Models.Tokenization;

namespace LoRAHub.Models.Tests;

public sealed class TokenizerTests
{
    [ThreadStatic] private static string? WrittenPath;

    private static Tokenizer Write(JsonObject json)
    {
        var path = Path.Combine(TinyModels.TempFolder(), "tokenizer.json");
        File.WriteAllText(path, json.ToJsonString());
        WrittenPath = path;
        return Tokenizer.FromFile(path);
    }

    // GPT-2 style: byte-level pre-tokenizer (Ġ is the space byte), merges in both file forms, one special token.
    private static Tokenizer ByteLevelBpe()
    {
        string[] tokens = ["h", "e", "l", "o", "Ġ", "w", "r", "d", "!", "he", "ll", "hell", "hello", "Ġw", "or"];
        var vocab = new JsonObject();
        for (var i = 0; i < tokens.Length; i++) vocab[tokens[i]] = i;
        return Write(new JsonObject
        {
            ["added_tokens"] = new JsonArray(new JsonObject { ["id"] = 15, ["content"] = "<|endoftext|>", ["special"] = true }),
            ["normalizer"] = null,
            ["pre_tokenizer"] = new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["use_regex"] = true },
            ["post_processor"] = new JsonObject { ["type"] = "ByteLevel" },
            ["decoder"] = new JsonObject { ["type"] = "ByteLevel" },
            ["model"] = new JsonObject
            {
                ["type"] = "BPE",
                ["vocab"] = vocab,
                ["merges"] = new JsonArray("h e", "l l", new JsonArray("he", "ll"), "hell o", new JsonArray("Ġ", "w"), "o r"),
            },
        });
    }

    [Fact]
    public void Byte_level_bpe_gives_exact_ids_and_round_trips()
    {
        var tok = ByteLevelBpe();
        // "hello" merges fully; " world" → Ġw, or, l, d (no merge joins them further).
        Assert.Equal([12, 13, 14, 2, 7, 8, 15], tok.Encode("hello world!<|endoftext|>"));
        Assert.Equal("hello world!<|endoftext|>", tok.Decode(tok.Encode("hello world!<|endoftext|>"), skipSpecialTokens: false));
        Assert.Equal("hello world!", tok.Decode(tok.Encode("hello world!<|endoftext|>")));
        Assert.Equal(16, tok.VocabSize);
        Assert.Equal(15, tok.EosTokenId);
    }

    [Fact]
    public void A_character_the_vocabulary_cannot_encode_is_named_with_its_position_in_the_text()
    {
        var tok = ByteLevelBpe(); // no unk_token, no byte fallback

        var plain = Assert.Throws<UnencodableTextException>(() => tok.Encode("hello wox"));
        Assert.Equal(("x", 8), (plain.Character, plain.Position));
        Assert.StartsWith("the text has 'x' (U+0078) at position 8, which this model's vocabulary cannot encode", plain.Message);
        // After an added token, and a character that byte-level maps to other symbols (é: Ã ©): named as written.
        var mapped = Assert.Throws<UnencodableTextException>(() => tok.Encode("<|endoftext|>hell\u00e9"));
        Assert.Equal(("\u00e9", 17), (mapped.Character, mapped.Position));
        Assert.Contains("'\u00e9' (U+00E9) at position 17", mapped.Message);
        Assert.IsAssignableFrom<ArgumentException>(mapped); // bad input, as callers report it
    }

    [Fact]
    public void Byte_level_map_is_reversible_for_every_byte()
    {
        var text = "héllo\n\t 世界 🙂\u0000";
        var mapped = ByteLevel.Encode(text);
        Assert.DoesNotContain(mapped, c => char.IsWhiteSpace(c) || char.IsControl(c));
        var bytes = mapped.SelectMany(c => ByteLevel.DecodeToken(c.ToString())).ToArray();
        Assert.Equal(text, System.Text.Encoding.UTF8.GetString(bytes));
        Assert.Equal("Ġ", ByteLevel.Encode(" "));
        Assert.Equal("Ċ", ByteLevel.Encode("\n"));
    }

    [Fact]
    public void Gpt2_and_llama3_patterns_split_words_like_tokenizers()
    {
        var gpt2 = new System.Text.RegularExpressions.Regex(PreTokenizer.Gpt2Pattern);
        Assert.Equal(["I", "'m", " fine", ",", " 12345", "  ", " ok"], gpt2.Matches("I'm fine, 12345   ok").Select(m => m.Value));
        var llama3 = new System.Text.RegularExpressions.Regex(PreTokenizer.Llama3Pattern);
        Assert.Equal(["I", "'M", " fine", ",", " ", "123", "45", "  ", " ok"], llama3.Matches("I'M fine, 12345   ok").Select(m => m.Value));
    }

    // Llama 2 / TinyLlama style: "▁" normalizer, byte fallback tokens, <s> from the post-processor.
    private static Tokenizer SentencePieceBpe(bool metaspace = false)
    {
        var vocab = new JsonObject { ["<unk>"] = 0, ["<s>"] = 1, ["</s>"] = 2 };
        for (var b = 0; b < 256; b++) vocab[$"<0x{b:X2}>"] = 3 + b;
        string[] pieces = ["▁", "h", "i", "▁h", "▁hi", "t", "▁t"];
        for (var i = 0; i < pieces.Length; i++) vocab[pieces[i]] = 259 + i;
        JsonObject Special(int id, string content) => new() { ["id"] = id, ["content"] = content, ["special"] = true };
        JsonObject Replace(string from, string to) => new() { ["type"] = "Replace", ["pattern"] = new JsonObject { ["String"] = from }, ["content"] = to };
        var json = new JsonObject
        {
            ["added_tokens"] = new JsonArray(Special(0, "<unk>"), Special(1, "<s>"), Special(2, "</s>")),
            ["normalizer"] = new JsonObject
            {
                ["type"] = "Sequence",
                ["normalizers"] = new JsonArray(new JsonObject { ["type"] = "Prepend", ["prepend"] = "▁" }, Replace(" ", "▁")),
            },
            ["pre_tokenizer"] = null,
            ["post_processor"] = new JsonObject
            {
                ["type"] = "TemplateProcessing",
                ["single"] = new JsonArray(
                    new JsonObject { ["SpecialToken"] = new JsonObject { ["id"] = "<s>", ["type_id"] = 0 } },
                    new JsonObject { ["Sequence"] = new JsonObject { ["id"] = "A", ["type_id"] = 0 } }),
                ["special_tokens"] = new JsonObject
                {
                    ["<s>"] = new JsonObject { ["id"] = "<s>", ["ids"] = new JsonArray(1), ["tokens"] = new JsonArray("<s>") },
                },
            },
            ["decoder"] = new JsonObject
            {
                ["type"] = "Sequence",
                ["decoders"] = new JsonArray(Replace("▁", " "), new JsonObject { ["type"] = "ByteFallback" }, new JsonObject { ["type"] = "Fuse" },
                    new JsonObject { ["type"] = "Strip", ["content"] = " ", ["start"] = 1, ["stop"] = 0 }),
            },
            ["model"] = new JsonObject
            {
                ["type"] = "BPE", ["unk_token"] = "<unk>", ["fuse_unk"] = true, ["byte_fallback"] = true,
                ["vocab"] = vocab,
                ["merges"] = new JsonArray("▁ h", "▁h i", "▁ t"),
            },
        };
        if (metaspace)
        {
            // The newer form (Mistral, recent Llama 2 conversions): no normalizer, Metaspace pre-tokenizer and decoder.
            json["normalizer"] = null;
            json["pre_tokenizer"] = new JsonObject { ["type"] = "Metaspace", ["replacement"] = "▁", ["prepend_scheme"] = "first", ["split"] = false };
            json["decoder"] = new JsonObject { ["type"] = "Metaspace", ["replacement"] = "▁", ["prepend_scheme"] = "first", ["split"] = false };
        }
        return Write(json);
    }

    [Fact]
    public void Metaspace_pre_tokenizer_matches_the_normalizer_form()
    {
        var tok = SentencePieceBpe(metaspace: true);
        Assert.Equal([1, 263, 265], tok.Encode("hi t"));
        Assert.Equal("hi t", tok.Decode([1, 263, 265]));
    }

    [Fact]
    public void Folder_reads_tokenizer_config_tokens_and_chat_format()
    {
        SentencePieceBpe(); // writes WrittenPath
        var folder = TinyModels.TempFolder();
        File.Copy(WrittenPath!, Path.Combine(folder, "tokenizer.json"));
        File.WriteAllText(Path.Combine(folder, "tokenizer_config.json"),
            """{"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<unk>", "chat_template": "{{ '<|user|>' }}"}""");
        var fromFolder = Tokenizer.FromFolder(folder);
        Assert.Equal(2, fromFolder.EosTokenId);
        Assert.Equal(0, fromFolder.PadTokenId);
        Assert.Equal("zephyr", fromFolder.ChatTemplate.Name);
        Assert.Equal([1, 263], fromFolder.Encode("hi"));
    }

    [Fact]
    public void Sentencepiece_style_falls_back_to_utf8_bytes()
    {
        var tok = SentencePieceBpe();
        // "hi é" → ▁hi ▁ é; é is not in the vocabulary, so its UTF-8 bytes C3 A9 become <0xC3> <0xA9>.
        var ids = tok.Encode("hi é");
        Assert.Equal([1, 263, 259, 3 + 0xC3, 3 + 0xA9], ids);
        Assert.Equal("hi é", tok.Decode(ids));
        Assert.Equal("<s> hi é", tok.Decode(ids, skipSpecialTokens: false).Replace("<s>hi", "<s> hi"));
        Assert.Equal([263, 265, 2], tok.Encode("hi t</s>", addSpecialTokens: false));
        Assert.Equal(1, tok.BosTokenId);
        Assert.Equal(2, tok.EosTokenId);
    }

    [Fact]
    public void Chat_templates_render_known_formats()
    {
        (string, string)[] messages = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Bye")];
        Assert.Equal("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
            ChatTemplate.Get("chatml").Apply(messages, true));
        Assert.Equal("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            ChatTemplate.Get("llama3").Apply([("user", "Hi")], true));
        Assert.Equal("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Bye [/INST]", ChatTemplate.Get("llama2").Apply(messages, true));
        Assert.Equal("<|user|>\nHi</s>\n<|assistant|>\n", ChatTemplate.Get("zephyr").Apply([("user", "Hi")], true));
        Assert.Equal("chatml", ChatTemplate.Guess("{% for m in messages %}<|im_start|>{{ m.role }}").Name);
        Assert.Throws<ArgumentException>(() => ChatTemplate.Get("alpaca"));
    }
}

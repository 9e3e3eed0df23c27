using System.Text.Json;
using LoRAHub.Host.Commands;
using LoRAHub.Host.Everyday;
using LoRAHub.Host.Plugins;
using LoRAHub.Models;
using LoRAHub.Models.Tokenization;
using LoRAHub.TorchExtensions;
using LoRAHub.Training.Data;
using TorchSharp;

namespace LoRAHub.Host.Tests;

/// <summary>merge, generate, eval and new on the embedded model, through the CLI as users call them.</summary>
[Collection(EmbeddedModelCollection.Name)]
public sealed class EverydayCommandsTests(EmbeddedModelFixture fixture) : IDisposable
{
    private readonly TempFolder temp = new();

    public void Dispose() => temp.Dispose();

    private static JsonElement Json(string output) => JsonDocument.Parse(output).RootElement.Clone();

    private async Task<string[]> Generate(params string[] args)
    {
        var (code, output, error) = await fixture.Cli(["generate", fixture.BaseModel, "--max-new-tokens", "10", "--json", .. args]);
        Assert.True(code == ExitCodes.Ok, error);
        return Json(output).EnumerateArray().Select(r => r.GetProperty("text").GetString()!).ToArray();
    }

    [Fact]
    public async Task Version_prints_the_host_version()
    {
        var output = new StringWriter();
        var code = await new LoRAHubCli(output, new StringWriter(), AppContext.BaseDirectory).InvokeAsync(["--version"]);

        Assert.Equal(ExitCodes.Ok, code);
        Assert.StartsWith(typeof(LoRAHubCli).Assembly.GetName().Version!.ToString(3), output.ToString().Trim());
    }

    [Fact]
    public async Task Generate_with_two_adapters_and_the_base_in_one_batch_equals_each_alone()
    {
        string[] prompts = ["copy abcd = ", "the red fox"];
        var batched = await Generate("-p", prompts[0], "-p", prompts[1], "-a", $"a={fixture.AdapterA}", "-a", $"b={fixture.AdapterB}", "--base");

        var alone = new List<string>();
        foreach (var adapter in new[] { $"a={fixture.AdapterA}", $"b={fixture.AdapterB}" })
            foreach (var prompt in prompts)
                alone.AddRange(await Generate("-p", prompt, "-a", adapter));
        foreach (var prompt in prompts) alone.AddRange(await Generate("-p", prompt));

        Assert.Equal(alone, batched);
        // The adapters do change the answers, so equal texts mean each row really used its own adapter.
        Assert.NotEqual(batched[0..2], batched[4..6]);
        Assert.NotEqual(batched[2..4], batched[4..6]);
        Assert.NotEqual(batched[0..2], batched[2..4]);
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public async Task Generate_mixes_lora_and_dora_adapters_in_either_order_each_row_as_alone(bool loraFirst)
    {
        string[] prompts = ["copy abcd = ", "the red fox"];
        string[] order = loraFirst ? [$"lora={fixture.AdapterA}", $"dora={fixture.AdapterDora}"] : [$"dora={fixture.AdapterDora}", $"lora={fixture.AdapterA}"];
        var batched = await Generate("-p", prompts[0], "-p", prompts[1], "-a", order[0], "-a", order[1], "--base");

        var alone = new List<string>();
        foreach (var adapter in order)
            foreach (var prompt in prompts)
                alone.AddRange(await Generate("-p", prompt, "-a", adapter)); // alone, the DoRA folder loads with the dora method
        foreach (var prompt in prompts) alone.AddRange(await Generate("-p", prompt));

        Assert.Equal(alone, batched);
        Assert.NotEqual(batched[0..2], batched[2..4]);
        Assert.NotEqual(batched[0..2], batched[4..6]);
        Assert.NotEqual(batched[2..4], batched[4..6]);
    }

    [Fact]
    public async Task Generate_runs_an_adapter_that_cannot_share_a_batch_in_its_own_keeping_the_order_of_the_adapters()
    {
        var full = temp.Combine("full");
        using (var model = PretrainedModel.LoadLlama(fixture.BaseModel))
        {
            torchx.manual_seed(4);
            using var adapter = new LoRAHub.Training.FullFineTuning().Attach(model, null!);
            using (torch.no_grad())
                foreach (var (key, p) in model.named_parameters())
                    if (key.Contains("mlp")) p.add_(torch.randn(p.shape) * 0.2);
            adapter.Save(full);
        }
        string[] adapters = [$"a={fixture.AdapterA}", $"full={full}", $"dora={fixture.AdapterDora}"];
        var (code, output, error) = await fixture.Cli(["generate", fixture.BaseModel, "--max-new-tokens", "10", "--json", "-p", "copy abcd = ",
            "-a", adapters[0], "-a", adapters[1], "-a", adapters[2], "--base"]);
        Assert.True(code == ExitCodes.Ok, error);
        var rows = Json(output).EnumerateArray().ToList();

        Assert.Equal(["a", "full", "dora", "__base__"], rows.Select(r => r.GetProperty("adapter").GetString()));
        var alone = new List<string>();
        foreach (var adapter in adapters) alone.AddRange(await Generate("-p", "copy abcd = ", "-a", adapter));
        alone.AddRange(await Generate("-p", "copy abcd = "));
        Assert.Equal(alone, rows.Select(r => r.GetProperty("text").GetString()!));
        Assert.NotEqual(alone[1], alone[3]); // the full fine-tune changes the answer
    }

    [Fact]
    public async Task Generate_refuses_prompt_and_new_tokens_past_the_models_positions()
    {
        // "copy abcd = " is 12 tokens; examples/base-model has 256 positions.
        var (code, _, error) = await fixture.Cli("generate", fixture.BaseModel, "-p", "copy abcd = ", "--max-new-tokens", "245");

        Assert.Equal(ExitCodes.UsageError, code);
        Assert.Contains("a prompt of 12 tokens and 245 new tokens need 257 positions, but the model has 256", error);
        Assert.Equal(ExitCodes.Ok, (await fixture.Cli("generate", fixture.BaseModel, "-p", "copy abcd = ", "--max-new-tokens", "244")).Code);
    }

    [Fact]
    public async Task Generate_chat_renders_the_template_and_stop_strings_end_the_answer()
    {
        var (code, output, error) = await fixture.Cli("generate", fixture.BaseModel, "--chat", "hello", "--system", "be brief", "--max-new-tokens", "12", "--stop", "o", "--json");

        Assert.True(code == ExitCodes.Ok, error);
        // The embedded model has no tokenizer_config.json: the plain format is used, and said so.
        Assert.Contains("note: base-model has no chat template (no chat_template in tokenizer_config.json); --chat uses plain 'role: content' lines", error);
        var result = Json(output)[0];
        var tokenizer = Tokenizer.FromFolder(fixture.BaseModel);
        Assert.Equal(tokenizer.ApplyChatTemplate([("system", "be brief"), ("user", "hello")], addGenerationPrompt: true), result.GetProperty("prompt").GetString());
        Assert.DoesNotContain("o", result.GetProperty("text").GetString());
    }

    [Fact]
    public async Task Merge_writes_a_model_folder_that_answers_as_base_plus_adapter()
    {
        var merged = temp.Combine("merged");

        var (code, output, error) = await fixture.Cli("merge", fixture.BaseModel, fixture.AdapterA, "-o", merged, "--json");

        Assert.True(code == ExitCodes.Ok, error);
        Assert.Equal("lora", Json(output).GetProperty("method").GetString());
        Assert.Equal("Float32", Json(output).GetProperty("dtype").GetString()); // "dtype", as --dtype spells it
        Assert.True(File.Exists(Path.Combine(merged, "tokenizer.json")));
        using (var model = PretrainedModel.LoadLlama(merged))
        using (var plain = PretrainedModel.LoadLlama(fixture.BaseModel))
            Assert.Equal(plain.state_dict().Keys.Order(), model.state_dict().Keys.Order()); // no adapter keys: an ordinary folder
        var viaMerged = await fixture.Cli("generate", merged, "-p", "the red fox", "--max-new-tokens", "10");
        Assert.Equal((await Generate("-p", "the red fox", "-a", fixture.AdapterA))[0], viaMerged.Output.TrimEnd('\n'));

        var again = await fixture.Cli("merge", fixture.BaseModel, fixture.AdapterA, "-o", merged);
        Assert.Equal(ExitCodes.UsageError, again.Code);
        Assert.Contains("not empty", again.Error);
    }

    [Fact]
    public async Task Eval_reports_token_weighted_loss_perplexity_and_exact_match()
    {
        var data = temp.Write("set.jsonl", string.Join("\n",
            """{"prompt": "copy abcd = ", "completion": "abcd"}""",
            """{"prompt": "copy klmn = ", "completion": "klmn"}""",
            """{"messages": [{"role": "user", "content": "copy qrst"}, {"role": "assistant", "content": "qrst"}]}""",
            """{"text": "the old dog sees the quick cat."}""") + "\n");

        var (code, output, error) = await fixture.Cli("eval", fixture.BaseModel, data, "-a", fixture.AdapterB, "--batch-size", "3", "--stop", "\n", "--json");

        Assert.True(code == ExitCodes.Ok, error);
        var result = Json(output);
        Assert.Equal(4, result.GetProperty("records").GetInt32());
        Assert.Equal(3, result.GetProperty("exact_match_total").GetInt32()); // the text record has no answer
        // The loss is the mean over every label token, whatever the batching: one record at a time, weighted by hand.
        using var loaded = LoadedModel.Load(fixture.BaseModel);
        using var adapter = fixture.Methods.ForFolder(fixture.AdapterB).Load(loaded.Model, fixture.AdapterB);
        double total = 0;
        long count = 0;
        using (torch.no_grad())
            foreach (var example in TextDataset.LoadJsonl(data, loaded.Tokenizer).Examples)
            {
                using var batch = DataLoader.Collate([example], loaded.Tokenizer.PadTokenId, loaded.Model.Device);
                var n = example.Labels.Skip(1).Count(l => l != TokenizedExample.IgnoreIndex);
                total += loaded.Model.ComputeLoss(batch.InputIds, batch.Labels).to(torch.ScalarType.Float64).item<double>() * n;
                count += n;
            }
        Assert.Equal(count, result.GetProperty("label_tokens").GetInt64());
        Assert.Equal(total / count, result.GetProperty("loss").GetDouble(), 1e-4);
        Assert.Equal(Math.Exp(total / count), result.GetProperty("perplexity").GetDouble(), 1e-3);
        // Exact match agrees with what generate answers for each prompt.
        var answers = new[] { ("copy abcd = ", "abcd"), ("copy klmn = ", "klmn") };
        var expected = 0;
        foreach (var (prompt, answer) in answers)
            if ((await Generate("-p", prompt, "-a", fixture.AdapterB, "--stop", "\n"))[0].Trim() == answer) expected++;
        var chat = await fixture.Cli("generate", fixture.BaseModel, "--chat", "copy qrst", "-a", fixture.AdapterB, "--stop", "\n", "--max-new-tokens", "10");
        if (chat.Output.Trim() == "qrst") expected++;
        Assert.Equal(expected, result.GetProperty("exact_matches").GetInt32());
    }

    [Fact]
    public async Task Eval_names_the_bad_line_of_a_malformed_set()
    {
        var data = temp.Write("bad.jsonl", "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": 3}\n");

        var (code, _, error) = await fixture.Cli("eval", fixture.BaseModel, data);

        Assert.NotEqual(ExitCodes.Ok, code);
        Assert.Contains("bad.jsonl", error);
        Assert.Contains("2", error);
    }

    [Fact]
    public async Task New_scaffolds_a_method_plugin_and_a_script_with_its_model()
    {
        var (code, output, error) = await fixture.Cli("new", "method", "Foo", "-o", temp.Combine("Foo"));

        Assert.True(code == ExitCodes.Ok, error);
        Assert.Contains("wrote", output);
        Assert.True(File.Exists(temp.Combine("Foo", "FooMethod.cs")));
        Assert.False(Directory.Exists(temp.Combine("Foo", ".template.config")));
        var project = File.ReadAllText(temp.Combine("Foo", "Foo.csproj"));
        Assert.Contains("<AssemblyName>Foo</AssemblyName>", project);
        Assert.Contains(Path.TrimEndingDirectorySeparator(AppContext.BaseDirectory), project); // compiles against this host
        Assert.Contains("Name => \"foo\"", File.ReadAllText(temp.Combine("Foo", "FooMethod.cs")));
        Assert.Contains("PeftType = \"FOO\"", File.ReadAllText(temp.Combine("Foo", "FooMethod.cs"))); // upper case, as dotnet new writes it
        // The build command puts the plugin where the host looks by default (the per-user plugin folder).
        Assert.Contains($"-o {Path.Combine(PluginFolders.UserDirectory(), "Foo")}", output);
        foreach (var file in Directory.GetFiles(temp.Combine("Foo")))
            Assert.DoesNotMatch("MethodPlugin|methodplugin|LORAHUB_HOME_DEFAULT", File.ReadAllText(file));

        var script = await fixture.Cli("new", "script", temp.Combine("job"));
        Assert.True(script.Code == ExitCodes.Ok, script.Error);
        Assert.True(File.Exists(temp.Combine("job", "finetune.csx")));
        Assert.True(File.Exists(temp.Combine("job", "tasks.csx")));
        Assert.True(File.Exists(temp.Combine("job", "base-model", "model.safetensors")));

        var clash = await fixture.Cli("new", "method", "Foo", "-o", temp.Combine("Foo"));
        Assert.Equal(ExitCodes.UsageError, clash.Code);
        var badName = await fixture.Cli("new", "method", "9lives");
        Assert.Equal(ExitCodes.UsageError, badName.Code);
        Assert.Contains("bad plugin name", badName.Error);
    }

    [Fact]
    public async Task Generate_without_a_prompt_or_with_an_unknown_adapter_folder_is_a_usage_error()
    {
        var none = await fixture.Cli("generate", fixture.BaseModel);
        Assert.Equal(ExitCodes.UsageError, none.Code);
        Assert.Contains("--prompt", none.Error);

        var missing = await fixture.Cli("generate", fixture.BaseModel, "-p", "x", "-a", temp.Combine("nope"));
        Assert.Equal(ExitCodes.UsageError, missing.Code);
        Assert.Contains("nope", missing.Error);
    }

    [Theory]
    [InlineData("--max-batch-size", "0", "--max-batch-size must be at least 1")]
    [InlineData("--host", "example.org", "is not an IP address")]
    [InlineData("--port", "70000", "is not a TCP port")]
    [InlineData("--max-model-len", "0", "--max-model-len must be at least 1")]
    public async Task Serve_refuses_bad_options_before_loading_anything(string option, string value, string message)
    {
        var (code, output, error) = await fixture.Cli("serve", fixture.BaseModel, option, value);

        Assert.Equal(ExitCodes.UsageError, code);
        Assert.Contains(message, error);
        Assert.DoesNotContain("serving", output);
    }

    [Fact]
    public async Task An_error_of_bad_input_is_printed_without_its_type_name()
    {
        var model = temp.Combine("bad-model");
        Directory.CreateDirectory(model);
        File.Copy(Path.Combine(fixture.BaseModel, "tokenizer.json"), Path.Combine(model, "tokenizer.json"));
        File.WriteAllText(Path.Combine(model, "config.json"), "[1, 2]");

        var (code, _, error) = await fixture.Cli("generate", model, "-p", "x");

        Assert.NotEqual(ExitCodes.Ok, code);
        Assert.StartsWith($"error: {Path.Combine(model, "config.json")}: not a model config", error);
    }

    [Fact]
    public async Task An_adapter_folder_where_a_model_belongs_says_which_is_which()
    {
        var generate = await fixture.Cli("generate", fixture.AdapterA, "-p", "x");
        Assert.Equal(ExitCodes.UsageError, generate.Code);
        Assert.Contains($"error: {fixture.AdapterA} is an adapter folder (adapter_config.json), not a model; pass its base model", generate.Error);
        var recorded = Json(File.ReadAllText(Path.Combine(fixture.AdapterA, "adapter_config.json"))).GetProperty("base_model_name_or_path").GetString();
        Assert.Contains($"pass its base model (base_model_name_or_path: {recorded}) as the model and the adapter with -a {fixture.AdapterA}", generate.Error);
        Assert.DoesNotContain("tokenizer.json", generate.Error);

        // merge with its arguments swapped: the base folder passes as a full fine-tune (the built-in `full` claims a
        // folder of model weights), the adapter in the base's place is named.
        var swapped = await fixture.Cli("merge", fixture.AdapterA, fixture.BaseModel, "-o", temp.Combine("merged"));
        Assert.Equal(ExitCodes.UsageError, swapped.Code);
        Assert.Contains($"error: {fixture.AdapterA} is an adapter folder (adapter_config.json), not a model", swapped.Error);
        Assert.Contains("(merge: base model first, then the adapter)", swapped.Error);
        Assert.False(Directory.Exists(temp.Combine("merged")) && Directory.EnumerateFileSystemEntries(temp.Combine("merged")).Any());

        // Without `full`, a model folder given as the adapter is named as one.
        var asAdapter = Assert.Throws<ArgumentException>(() => fixture.Methods.ForFolder(fixture.BaseModel));
        Assert.StartsWith($"{fixture.BaseModel} is a model folder (config.json), not an adapter (adapter_config.json)", asAdapter.Message);
    }

    [Fact]
    public async Task A_prompt_character_the_tokenizer_cannot_encode_is_a_usage_error_naming_it()
    {
        var (code, output, error) = await fixture.Cli("generate", fixture.BaseModel, "-p", "copy Abcd");

        Assert.Equal(ExitCodes.UsageError, code);
        Assert.StartsWith("error: the text has 'A' (U+0041) at position 5, which this model's vocabulary cannot encode", error);
        Assert.Equal("", output);
    }

    [Theory]
    [InlineData("--max-new-tokens", "-5", "--max-new-tokens must be at least 1, got -5")]
    [InlineData("--max-new-tokens", "0", "--max-new-tokens must be at least 1, got 0")]
    [InlineData("--top-p", "2", "--top-p must be in (0, 1] (1: off), got 2")]
    [InlineData("--top-k", "-3", "--top-k must be 0 or -1 (off) or positive, got -3")]
    [InlineData("--temperature", "-1", "--temperature must be between 0 and 2 (0: greedy), got -1")]
    public async Task Generate_refuses_sampling_options_out_of_range_as_serve_does(string option, string value, string message)
    {
        var (code, output, error) = await fixture.Cli("generate", fixture.BaseModel, "-p", "x", option, value);

        Assert.Equal(ExitCodes.UsageError, code);
        Assert.Equal($"error: {message}", error.Trim());
        Assert.Equal("", output);
    }

    [Fact]
    public async Task Eval_refuses_a_bad_max_new_tokens_and_a_max_length_that_leaves_no_label()
    {
        var data = temp.Write("set.jsonl", """{"prompt": "copy abcd = ", "completion": "abcd"}""" + "\n");

        var negative = await fixture.Cli("eval", fixture.BaseModel, data, "--max-new-tokens", "-1");
        Assert.Equal(ExitCodes.UsageError, negative.Code);
        Assert.Contains("error: --max-new-tokens must be at least 1, got -1", negative.Error);

        var (code, output, error) = await fixture.Cli("eval", fixture.BaseModel, data, "--max-length", "3");
        Assert.Equal(ExitCodes.UsageError, code);
        Assert.DoesNotContain("NaN", output);
        var tokens = Tokenizer.FromFolder(fixture.BaseModel).Encode("copy abcd = ").Length; // the prompt, masked; the answer follows
        Assert.Contains($"error: no label tokens left after truncating records to 3 tokens (--max-length): raise it to at least {tokens + 1} (the longest record has ", error);
    }

    [Fact]
    public async Task Serve_on_a_port_in_use_says_so_and_how_to_pick_another()
    {
        using var taken = new System.Net.Sockets.TcpListener(System.Net.IPAddress.Loopback, 0);
        taken.Start();
        var port = ((System.Net.IPEndPoint)taken.LocalEndpoint).Port;

        var (code, output, error) = await fixture.Cli("serve", fixture.BaseModel, "--port", port.ToString());

        Assert.Equal(ExitCodes.UsageError, code);
        Assert.Equal($"error: port {port} on 127.0.0.1 is in use (another serve running?); pass --port with another port, or --port 0 for a free one", error.Trim());
        Assert.DoesNotContain("serving", output);
    }
}

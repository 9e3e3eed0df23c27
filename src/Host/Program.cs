using LoRAHub.Host.Commands;

return await new LoRAHubCli(Console.Out, Console.Error).InvokeAsync(args);

import PocketLLMCore
import SwiftUI

/// The conversation, streamed replies with their prefill / decode speed, and the input bar with send and stop.
struct ChatView: View {
    @Environment(AppModel.self) private var model
    @State private var draft = ""
    @State private var showingSettings = false

    var body: some View {
        VStack(spacing: 0) {
            ScrollViewReader { proxy in
                ScrollView {
                    LazyVStack(alignment: .leading, spacing: 12) {
                        if let notice = model.notice {
                            Text(notice).font(.footnote).foregroundStyle(.secondary)
                        }
                        ForEach(model.turns) { turn in
                            TurnView(turn: turn).id(turn.id)
                        }
                        if let error = model.chatError {
                            ErrorView(screen: error, retry: nil)
                        }
                    }
                    .padding()
                }
                .onChange(of: model.turns.last?.message.content) {
                    if let last = model.turns.last { proxy.scrollTo(last.id, anchor: .bottom) }
                }
            }
            Divider()
            inputBar
        }
        .toolbar {
            ToolbarItemGroup(placement: .topBarTrailing) {
                Button {
                    model.newChat()
                } label: {
                    Label("New chat", systemImage: "square.and.pencil")
                }
                .disabled(model.isGenerating)
                Button {
                    showingSettings = true
                } label: {
                    Label("Settings", systemImage: "slider.horizontal.3")
                }
            }
        }
        .sheet(isPresented: $showingSettings) {
            SettingsView()
        }
    }

    private var inputBar: some View {
        HStack(alignment: .bottom, spacing: 8) {
            TextField("Message", text: $draft, axis: .vertical)
                .lineLimit(1...6)
                .textFieldStyle(.roundedBorder)
                .disabled(model.isGenerating)
                .onSubmit { send() }
            if model.isGenerating {
                Button {
                    model.stop()
                } label: {
                    Image(systemName: "stop.circle.fill").font(.title)
                }
                .accessibilityLabel("Stop")
            } else {
                Button {
                    send()
                } label: {
                    Image(systemName: "arrow.up.circle.fill").font(.title)
                }
                .disabled(draft.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty)
                .accessibilityLabel("Send")
            }
        }
        .padding(.horizontal)
        .padding(.vertical, 8)
    }

    private func send() {
        model.send(draft)
        draft = ""
    }
}

struct TurnView: View {
    let turn: ChatTurn

    var body: some View {
        let isUser = turn.message.role == .user
        VStack(alignment: isUser ? .trailing : .leading, spacing: 4) {
            Text(turn.message.content.isEmpty && turn.streaming ? "…" : turn.message.content)
                .textSelection(.enabled)
                .padding(10)
                .background(isUser ? Color.accentColor.opacity(0.15) : Color.secondary.opacity(0.1),
                            in: RoundedRectangle(cornerRadius: 12))
            if let stats = turn.stats {
                Text(Self.statsLine(stats))
                    .font(.caption2.monospacedDigit())
                    .foregroundStyle(.secondary)
            }
        }
        .frame(maxWidth: .infinity, alignment: isUser ? .trailing : .leading)
    }

    static func statsLine(_ stats: GenerationStats) -> String {
        switch stats.stopReason {
        case .cancelled: return stats.summary + " · stopped"
        case .contextFull: return stats.summary + " · context full"
        case .stopToken, .maxTokens: return stats.summary
        }
    }
}

struct SettingsView: View {
    @Environment(AppModel.self) private var model
    @Environment(\.dismiss) private var dismiss

    var body: some View {
        @Bindable var model = model
        NavigationStack {
            Form {
                Section("Sampling") {
                    VStack(alignment: .leading) {
                        let greedy = model.settings.sampling.isGreedy ? " (greedy)" : ""
                        Text("Temperature \(model.settings.sampling.temperature, specifier: "%.2f")\(greedy)")
                        Slider(value: $model.settings.sampling.temperature, in: 0...2, step: 0.05)
                    }
                    VStack(alignment: .leading) {
                        Text("Top-p \(model.settings.sampling.topP, specifier: "%.2f")")
                        Slider(value: $model.settings.sampling.topP, in: 0.05...1, step: 0.05)
                    }
                    .disabled(model.settings.sampling.isGreedy)
                    Stepper("Max new tokens: \(model.settings.maxNewTokens)", value: $model.settings.maxNewTokens,
                            in: 16...4096, step: 16)
                }
                Section {
                    Toggle("Use the chat template", isOn: $model.settings.useChatTemplate)
                        .disabled(!model.templateAvailable)
                    TextField("System prompt", text: $model.settings.systemPrompt, axis: .vertical)
                        .lineLimit(2...8)
                        .disabled(!model.settings.useChatTemplate || !model.templateAvailable)
                } header: {
                    Text("Chat")
                } footer: {
                    Text(model.templateAvailable
                        ? "Off: the conversation is plain text the model continues (no system prompt)."
                        : "This bundle has no chat template (manifest chat is null).")
                }
                if let unsupported = model.engine?.info.unsupportedSettings, !unsupported.isEmpty {
                    Section("Not used by this runtime") {
                        Text(unsupported.joined(separator: ", ")).foregroundStyle(.secondary)
                    }
                }
                Section("Runtime") {
                    LabeledContent("Engine", value: model.engine?.info.detail ?? "not loaded")
                }
            }
            .navigationTitle("Settings")
            .navigationBarTitleDisplayMode(.inline)
            .toolbar {
                ToolbarItem(placement: .confirmationAction) {
                    Button("Done") { dismiss() }
                }
            }
        }
    }
}

import Foundation
import PocketLLMCore

/// A bundle folder in the app's Documents (where imports land, and what Finder file sharing shows).
struct BundleEntry: Identifiable, Hashable, Sendable {
    let url: URL
    let name: String
    /// "minicpm4 · any4 · Core ML, ExecuTorch", or nil when the manifest could not be read.
    let summary: String?
    /// Sum of the sizes manifest.json lists.
    let bytes: Int64
    /// Why the manifest cannot be used (shown in the list; opening the bundle shows the full error screen).
    let problem: String?

    var id: String { url.path }
}

/// File work for the library: scanning Documents, importing a picked folder, deleting. Everything here blocks, so
/// the app calls it from detached tasks.
enum BundleLibrary {
    static func documents() throws -> URL {
        try FileManager.default.url(for: .documentDirectory, in: .userDomainMask, appropriateFor: nil, create: true)
    }

    /// Folders of Documents holding a manifest.json, sorted by name.
    static func scan() throws -> [BundleEntry] {
        let root = try documents()
        let names = try FileManager.default.contentsOfDirectory(atPath: root.path)
        var entries: [BundleEntry] = []
        for name in names.sorted() where !name.hasPrefix(".") && name != "Inbox" {
            let url = root.appendingPathComponent(name, isDirectory: true)
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: url.path, isDirectory: &isDirectory), isDirectory.boolValue,
                FileManager.default.fileExists(atPath: url.appendingPathComponent(Manifest.fileName).path)
            else { continue }
            do {
                let manifest = try Manifest.load(bundle: url)
                let targets = manifest.targets.available.map(\.displayName).joined(separator: ", ")
                let summary = [manifest.architecture, manifest.quantization.scheme, targets.isEmpty ? "no app target" : targets]
                    .joined(separator: " · ")
                let bytes = manifest.files.values.reduce(Int64(0)) { $0 + $1.size }
                entries.append(BundleEntry(url: url, name: name, summary: summary, bytes: bytes, problem: nil))
            } catch {
                entries.append(BundleEntry(url: url, name: name, summary: nil, bytes: 0,
                                           problem: String(describing: error)))
            }
        }
        return entries
    }

    /// Copies a folder picked in Files (a security-scoped URL) into Documents, replacing a bundle of the same name.
    /// The copy goes to a temporary folder first and is moved into place whole, so a failed import leaves nothing.
    static func importFolder(_ picked: URL) throws -> URL {
        let accessing = picked.startAccessingSecurityScopedResource()
        defer { if accessing { picked.stopAccessingSecurityScopedResource() } }
        guard FileManager.default.fileExists(atPath: picked.appendingPathComponent(Manifest.fileName).path) else {
            throw PocketLLMError.manifestMissing(path: picked.appendingPathComponent(Manifest.fileName).path)
        }
        let staging = FileManager.default.temporaryDirectory
            .appendingPathComponent("import-\(UUID().uuidString)", isDirectory: true)
        try FileManager.default.createDirectory(at: staging, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: staging) }
        let copy = staging.appendingPathComponent(picked.lastPathComponent, isDirectory: true)

        // Coordinated read: a folder in iCloud Drive or a file provider is materialised before it is copied.
        var coordinationError: NSError?
        var copyError: Error?
        NSFileCoordinator().coordinate(readingItemAt: picked, options: [], error: &coordinationError) { readable in
            do {
                try copyBundle(from: readable, to: copy)
            } catch {
                copyError = error
            }
        }
        if let error = (coordinationError as Error?) ?? copyError { throw error }

        let destination = try documents().appendingPathComponent(picked.lastPathComponent, isDirectory: true)
        if FileManager.default.fileExists(atPath: destination.path) {
            try FileManager.default.removeItem(at: destination)
        }
        try FileManager.default.moveItem(at: copy, to: destination)
        return destination
    }

    /// Everything but reference/ (the weights parity reads on the laptop; apps never do, and it can be gigabytes).
    private static func copyBundle(from source: URL, to destination: URL) throws {
        try FileManager.default.createDirectory(at: destination, withIntermediateDirectories: true)
        for name in try FileManager.default.contentsOfDirectory(atPath: source.path) where name != "reference" {
            try FileManager.default.copyItem(at: source.appendingPathComponent(name),
                                             to: destination.appendingPathComponent(name))
        }
    }

    static func delete(_ entry: BundleEntry) throws {
        try FileManager.default.removeItem(at: entry.url)
    }
}

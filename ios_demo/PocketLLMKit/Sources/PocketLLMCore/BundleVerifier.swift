import Foundation

#if canImport(ObjectiveC)
import ObjectiveC
#endif

/// Where a verification is: bytes hashed so far out of the total the manifest lists, and the file being read.
public struct VerificationProgress: Sendable, Equatable {
    public let bytesDone: Int64
    public let bytesTotal: Int64
    public let file: String
    public let filesDone: Int
    public let filesTotal: Int

    public var fraction: Double {
        bytesTotal > 0 ? Double(bytesDone) / Double(bytesTotal) : 1
    }
}

/// Checks a bundle against its manifest before anything runs it: every listed file exists, has the listed size and
/// the listed sha256 (streamed in chunks, so a 4 GB model needs 4 MB of memory), no key escapes the bundle, and a
/// model directory (model.mlpackage) holds no file the manifest does not list.
public struct BundleVerifier: Sendable {
    public static let defaultChunkSize = 4 << 20

    public let bundle: URL
    public let manifest: Manifest
    public let chunkSize: Int

    public init(bundle: URL, manifest: Manifest, chunkSize: Int = BundleVerifier.defaultChunkSize) {
        self.bundle = bundle
        self.manifest = manifest
        self.chunkSize = max(1, chunkSize)
    }

    /// Hashes every file; calls `progress` after each chunk. Throws the first mismatch. Honors task cancellation
    /// (CancellationError) between chunks.
    public func verify(progress: (VerificationProgress) -> Void = { _ in }) throws {
        let keys = manifest.files.keys.sorted()
        for key in keys { try Self.checkRelativePath(key) }
        try checkArtifactsListed()
        try checkModelDirectories()
        let total = keys.reduce(Int64(0)) { $0 + (manifest.files[$1]?.size ?? 0) }
        var done: Int64 = 0
        for (index, key) in keys.enumerated() {
            guard let entry = manifest.files[key] else { continue }
            let size = try Self.regularFileSize(bundle.appendingPathComponent(key), key: key)
            guard size == entry.size else {
                throw PocketLLMError.sizeMismatch(path: key, actual: size, expected: entry.size)
            }
            let digest = try hashFile(bundle.appendingPathComponent(key)) { bytes in
                done += bytes
                progress(VerificationProgress(bytesDone: done, bytesTotal: total, file: key, filesDone: index,
                                              filesTotal: keys.count))
            }
            guard digest == entry.sha256.lowercased() else {
                throw PocketLLMError.hashMismatch(path: key, actual: digest, expected: entry.sha256)
            }
        }
        progress(VerificationProgress(bytesDone: done, bytesTotal: total, file: "", filesDone: keys.count,
                                      filesTotal: keys.count))
    }

    /// Keys of `files` are relative POSIX paths inside the bundle: no leading "/", no "." or ".." component, no
    /// backslash, nothing empty.
    public static func checkRelativePath(_ key: String) throws {
        let components = key.split(separator: "/", omittingEmptySubsequences: false)
        let bad = key.isEmpty || key.hasPrefix("/") || key.contains("\\")
            || components.contains { $0.isEmpty || $0 == "." || $0 == ".." }
        if bad { throw PocketLLMError.unsafePath(key: key) }
    }

    /// A target's model file (or every file of its model directory) is covered by `files`, so it is verified too.
    private func checkArtifactsListed() throws {
        for target in manifest.targets.available {
            guard let artifact = manifest.artifact(for: target) else { continue }
            let listed = artifact.isDirectory
                ? !manifest.files(under: artifact.path).isEmpty : manifest.files[artifact.path] != nil
            if !listed {
                throw PocketLLMError.manifestInvalid(path: Manifest.fileName, key: "files",
                                                     reason: "does not list \(artifact.path) (targets.\(target.rawValue).file)")
            }
        }
    }

    /// Every file under a target's model directory must be listed (hidden files such as .DS_Store aside).
    private func checkModelDirectories() throws {
        for target in manifest.targets.available {
            guard let artifact = manifest.artifact(for: target), artifact.isDirectory else { continue }
            let listed = Set(manifest.files(under: artifact.path))
            let root = bundle.appendingPathComponent(artifact.path)
            guard let walker = FileManager.default.enumerator(atPath: root.path) else {
                throw PocketLLMError.fileMissing(path: artifact.path)
            }
            while let relative = walker.nextObject() as? String {
                let key = artifact.path + "/" + relative
                if relative.split(separator: "/").contains(where: { $0.hasPrefix(".") }) { continue }
                var isDirectory: ObjCBool = false
                guard FileManager.default.fileExists(atPath: root.appendingPathComponent(relative).path,
                                                     isDirectory: &isDirectory),
                    !isDirectory.boolValue
                else { continue }
                if !listed.contains(key) {
                    throw PocketLLMError.unlistedFile(path: key, directory: artifact.path)
                }
            }
        }
    }

    private static func regularFileSize(_ url: URL, key: String) throws -> Int64 {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: url.path, isDirectory: &isDirectory), !isDirectory.boolValue
        else {
            throw PocketLLMError.fileMissing(path: key)
        }
        let attributes = try FileManager.default.attributesOfItem(atPath: url.path)
        if let size = attributes[.size] as? NSNumber { return size.int64Value }
        if let size = attributes[.size] as? Int64 { return size }
        if let size = attributes[.size] as? Int { return Int64(size) }
        throw PocketLLMError.manifestUnreadable(path: key, reason: "file size unavailable")
    }

    private func hashFile(_ url: URL, onChunk: (Int64) -> Void) throws -> String {
        let handle = try FileHandle(forReadingFrom: url)
        defer { try? handle.close() }
        var hasher = StreamingSHA256()
        while true {
            try Task.checkCancellation()
            let read: Data? = try withAutoreleasePool { try handle.read(upToCount: chunkSize) }
            guard let chunk = read, !chunk.isEmpty else { break }
            hasher.update(chunk)
            onChunk(Int64(chunk.count))
        }
        return hasher.finalizeHex()
    }
}

/// Releases the Data of each chunk right away on Apple platforms (FileHandle hands out autoreleased buffers).
@inline(__always)
func withAutoreleasePool<T>(_ body: () throws -> T) rethrows -> T {
    #if canImport(ObjectiveC)
    return try autoreleasepool(invoking: body)
    #else
    return try body()
    #endif
}
